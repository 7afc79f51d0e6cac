"""Graph breaks in a compiled training step of every method, peftkit's and PEFT's where PEFT has it.

``torch._dynamo.explain`` traces the forward and the loss (``model(input_ids=ids, labels=ids).loss``) of
the reference model in train mode, each method on LoRA's seven projections where it adapts layers, its
dropouts at 0.1 where it has any. A break splits the step into several graphs; the figure is peftkit's
count (goal 0), PEFT's is beside it with its most frequent reason.
"""

from __future__ import annotations

import collections
import dataclasses

import peft
import peftkit
import torch

from benchmarks.common import LORA_TARGETS, failure, plural, reference_batch, reference_model
from benchmarks.training_step import adapter_step

FEEDFORWARD = ["gate_proj", "up_proj", "down_proj"]
VIRTUAL_TOKENS = dict(task_type="CAUSAL_LM", num_virtual_tokens=16)


@dataclasses.dataclass(frozen=True)
class Case:
    """A method's config by its class name (the same in both libraries) and arguments."""

    label: str
    config: str
    kwargs: dict
    in_peft: bool = True
    biases: bool = False


LOW_RANK = dict(r=16, target_modules=LORA_TARGETS)
CASES = [
    Case("LoRA, dropout 0.1", "LoraConfig", dict(LOW_RANK, lora_alpha=32, lora_dropout=0.1)),
    Case("DoRA, dropout 0.1", "LoraConfig", dict(LOW_RANK, lora_alpha=32, lora_dropout=0.1, use_dora=True)),
    Case(
        "LoHa, rank and module dropout 0.1",
        "LoHaConfig",
        dict(LOW_RANK, rank_dropout=0.1, module_dropout=0.1),
    ),
    Case(
        "LoKr, rank and module dropout 0.1",
        "LoKrConfig",
        dict(LOW_RANK, rank_dropout=0.1, module_dropout=0.1),
    ),
    Case(
        "AdaLoRA, dropout 0.1",
        "AdaLoraConfig",
        dict(target_modules=LORA_TARGETS, init_r=12, target_r=8, lora_dropout=0.1, total_step=100),
    ),
    Case("IA3", "IA3Config", dict(target_modules=LORA_TARGETS, feedforward_modules=FEEDFORWARD)),
    Case("prompt tuning", "PromptTuningConfig", VIRTUAL_TOKENS),
    Case("prefix tuning", "PrefixTuningConfig", VIRTUAL_TOKENS),
    Case("P-tuning, encoder dropout 0.1", "PromptEncoderConfig", dict(VIRTUAL_TOKENS, encoder_dropout=0.1)),
    Case("bottleneck adapters, dropout 0.1", "BottleneckConfig", dict(dropout=0.1), in_peft=False),
    # Llama's linear layers have no bias: BitFit's case gives them one
    Case("BitFit, on the reference model with biases", "BitFitConfig", {}, in_peft=False, biases=True),
]


def explain(library, case: Case, device: str, ids: torch.Tensor):
    torch.manual_seed(0)
    base = (
        reference_model(device, attention_bias=True, mlp_bias=True)
        if case.biases
        else reference_model(device)
    )
    model = library.get_peft_model(base, getattr(library, case.config)(**case.kwargs))
    torch._dynamo.reset()
    try:
        return torch._dynamo.explain(adapter_step(model.train(), ids))()
    finally:
        torch._dynamo.reset()


def _reason(text: str) -> str:
    """Dynamo's reason in one short line: its kind and explanation, without the hints."""
    text = " ".join(text.split()).split(" Hint:")[0].replace(" Explanation:", ":")
    return text if len(text) <= 100 else text[:99] + "…"


def summary(explained) -> str:
    text = f"{plural(explained.graph_break_count, 'break')} ({plural(explained.graph_count, 'graph')})"
    reasons = collections.Counter(
        _reason(str(reason.reason)) for reason in explained.break_reasons
    ).most_common(1)
    return text + (f", most often: “{reasons[0][0]}” ×{reasons[0][1]}" if reasons else "")


def run(device: str) -> list[dict]:
    ids = reference_batch(device)
    rows = []
    for case in CASES:
        try:
            kit = explain(peftkit, case, device, ids)
            figure, detail = kit.graph_break_count, f"peftkit {summary(kit)}"
        except Exception as exc:  # reported in the row: one method's failure must not hide the others
            figure, detail = None, f"peftkit failed: {failure(exc)}"
        if not case.in_peft:
            detail += "; PEFT has no such method"
        else:
            try:
                detail += f"; PEFT {summary(explain(peft, case, device, ids))}"
            except Exception as exc:
                detail += f"; PEFT failed: {failure(exc)}"
        rows.append(
            {
                "what": f"graph breaks, compiled training step: {case.label}",
                "figure": figure,
                "against": "count",
                "goal": 0,
                "detail": detail,
            }
        )
    return rows
