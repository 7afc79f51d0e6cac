"""LoRA's training step under ``torch.compile`` (inductor, the default backend), and its first compile.

Step: forward and backward as in training_step.py, the forward (model and loss) compiled, the backward
running the graph AOT autograd made with it. Contenders: the compiled floor, peftkit's and PEFT's LoRA
at dropout 0 and 0.1. Each is compiled by one call before the timing, then all are timed interleaved.
The floor's input embeddings are looked up outside the compiled function and made a fresh leaf that
takes gradients on every call, so the graph gets them as its input; the lookup gathers 2 × 128 rows.
The number of graphs each contender's compile made (dynamo's count; 1: no graph break) is in its row.

First compile: a new ``torch.compile`` of a LoRA step at dropout 0.1 and its first forward and backward,
which compile both graphs, timed from a fresh start each time: dynamo reset, inductor's caches empty
(``torch._inductor.utils.fresh_cache``). One small function is compiled before, so that starting the
compiler's workers is timed for neither library. The repeats alternate between the libraries.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks.common import compiled_graphs, interleaved, plural, reference_batch, reference_model
from benchmarks.training_step import adapter_step, peft_model, peftkit_model, with_backward


def compiled_floor(model, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    embed = model.get_input_embeddings()
    loss = torch.compile(lambda inputs: model(inputs_embeds=inputs, labels=ids).loss)
    return lambda: loss(embed(ids).detach().requires_grad_(True))


def compiled_adapter(model, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    return torch.compile(adapter_step(model, ids))


def warm_up_compiler(device: str) -> None:
    """Start inductor (its imports and compile workers) on a small function, outside any timing."""
    torch._dynamo.reset()
    with torch._inductor.utils.fresh_cache():
        x = torch.randn(64, 64, device=device, requires_grad=True)
        torch.compile(lambda t: (t @ t).relu().sum())(x).backward()
    torch._dynamo.reset()


def run(device: str, rounds: int, compile_repeats: int = 3) -> list[dict]:
    ids = reference_batch(device)
    torch._dynamo.reset()
    models = {
        "floor": reference_model(device).train(),
        "peftkit LoRA, dropout 0": peftkit_model(device, 0.0),
        "PEFT LoRA, dropout 0": peft_model(device, 0.0),
        "peftkit LoRA, dropout 0.1": peftkit_model(device, 0.1),
        "PEFT LoRA, dropout 0.1": peft_model(device, 0.1),
    }
    steps, graphs = {}, {}
    for name, model in models.items():
        forward = (compiled_floor if name == "floor" else compiled_adapter)(model, ids)
        steps[name] = with_backward(forward, model)
        before = compiled_graphs()
        steps[name]()  # compiles
        graphs[name] = compiled_graphs() - before
    timing = interleaved(steps, device, rounds)
    torch._dynamo.reset()

    def row(what: str, name: str, baseline: str, goal: float | None, against: str) -> dict:
        return {
            "what": what,
            "figure": timing.ratio(name, baseline),
            "against": against,
            "goal": goal,
            "detail": f"{name} {timing.median(name) * 1e3:.1f} ms ({plural(graphs[name], 'graph')}), "
            f"{baseline} {timing.median(baseline) * 1e3:.1f} ms ({plural(graphs[baseline], 'graph')})",
        }

    kit0, peft0, kit1, peft1 = list(models)[1:]
    rows = [
        row("compiled LoRA training step, dropout 0", kit0, "floor", None, "compiled floor"),
        row("compiled LoRA training step, dropout 0", kit0, peft0, None, "compiled PEFT"),
        row("compiled LoRA training step, dropout 0.1", kit1, "floor", 1.10, "compiled floor"),
        row("compiled LoRA training step, dropout 0.1", kit1, peft1, 0.95, "compiled PEFT"),
        row("PEFT's compiled LoRA training step, dropout 0.1", peft1, "floor", None, "compiled floor"),
    ]
    del steps, models
    rows.append(first_compile_row(device, ids, compile_repeats))
    return rows


def first_compile_row(device: str, ids: torch.Tensor, repeats: int) -> dict:
    models = {"peftkit": peftkit_model(device, 0.1), "PEFT": peft_model(device, 0.1)}

    def compile_and_step(model):
        def call() -> None:
            with torch._inductor.utils.fresh_cache():
                with_backward(compiled_adapter(model, ids), model)()

        return call

    warm_up_compiler(device)
    timing = interleaved(
        {name: compile_and_step(model) for name, model in models.items()},
        device,
        repeats,
        warmup=0,
        setup={name: torch._dynamo.reset for name in models},
    )
    torch._dynamo.reset()
    return {
        "what": "first compile of a LoRA training step, dropout 0.1",
        "figure": timing.ratio("peftkit", "PEFT"),
        "against": "PEFT",
        "goal": 1.0,
        "detail": f"peftkit {timing.median('peftkit'):.1f} s, PEFT {timing.median('PEFT'):.1f} s; median of "
        f"{plural(repeats, 'cold compile')} each (dynamo reset, empty inductor caches), interleaved",
    }
