"""Composition blocks: how several adapters combine in one forward pass, with AdapterHub's names and meaning.

A block is a value ``set_adapter`` accepts (``model.set_adapter(Stack("lang", "task"))``); its children are
adapter names or other blocks, nested as :data:`ALLOWED_NESTINGS` allows (AdapterHub's ``adapters`` 1.3):

- ``Stack(a, b)``: ``a``, then ``b`` on what ``a`` made;
- ``Average(a, b, weights=[...])``: ``Σ wᵢ·(output with child i)``, weights normalised to sum 1 unless
  ``normalize_weights=False``; for additive methods, the base output plus ``Σ wᵢ·(child i's change)``;
- ``Split(a, b, splits=[...])``: the first ``splits[0]`` tokens of each sequence through ``a``, the next through ``b``;
- ``BatchSplit(a, b, batch_sizes=[...])``: the first ``batch_sizes[0]`` rows through ``a``, the next through ``b``;
- ``MultiTask(a, b)``: each row through the child that ``task_ids`` (a forward argument) names for it;
- ``Parallel(a, b)``: the batch repeated once per child, copy ``i`` through child ``i``; outputs have
  ``len(children)`` times the rows, child by child;
- ``Fuse(a, b)``: AdapterFusion over the children's outputs (methods that have a fusion layer; peftkit-bottleneck).

Which blocks an adapter may take part in, its method says (hook ``peftkit_composition_blocks``). How a layer
computes them, :meth:`peftkit.AdapterLayer.composed_output` says, by walking the block with :func:`compose`.
Row blocks (``BatchSplit``, ``MultiTask``, ``Parallel``) become :class:`Rows` for each call (:func:`resolve_rows`).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch

from peftkit.errors import ConfigError
from peftkit.mixed_batch import RowAdapters

Child = Union[str, "CompositionBlock"]


class CompositionBlock(Sequence):
    """A block of adapter names and nested blocks. Blocks are values: equal when type, children and
    arguments are equal; ``to_dict``/``from_dict`` write and read AdapterHub's JSON form."""

    def __init__(self, *children: Child) -> None:
        if not children:
            raise ConfigError(f"{type(self).__name__} needs at least one adapter name or block")
        for child in children:
            if not isinstance(child, (str, CompositionBlock)):
                raise ConfigError(
                    f"{type(self).__name__} takes adapter names (str) and composition blocks, got "
                    f"{type(child).__name__} {child!r}"
                )
        self.children: list[Child] = list(children)

    def __getitem__(self, index: Any) -> Any:
        return self.children[index]

    def __len__(self) -> int:
        return len(self.children)

    def _arguments(self) -> dict[str, Any]:
        return {}

    def __eq__(self, other: object) -> bool:
        return (
            type(other) is type(self)
            and self.children == other.children
            and self._arguments() == other._arguments()
        )

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(self.children), repr(self._arguments())))

    def __repr__(self) -> str:
        parts = [repr(child) for child in self.children]
        parts += [f"{name}={value!r}" for name, value in self._arguments().items()]
        return f"{type(self).__name__}({', '.join(parts)})"

    def flatten(self) -> list[str]:
        """Every adapter name in the block, in order of first appearance."""
        return _flatten(self.children)

    def first(self) -> str:
        child = self.children[0]
        return child if isinstance(child, str) else child.first()

    def last(self) -> str:
        child = self.children[-1]
        return child if isinstance(child, str) else child.last()

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "type": type(self).__name__,
            "children": [
                {"type": "single", "children": [child]} if isinstance(child, str) else child.to_dict()
                for child in self.children
            ],
        }
        if self._arguments():
            data["kwargs"] = self._arguments()
        return data

    @staticmethod
    def from_dict(data: dict[str, Any]) -> CompositionBlock:
        kind = BLOCKS.get(data.get("type"))
        if kind is None:
            raise ConfigError(
                f"unknown composition block type {data.get('type')!r}; known: {', '.join(BLOCKS)}"
            )
        children = [
            child["children"][0] if child["type"] == "single" else CompositionBlock.from_dict(child)
            for child in data["children"]
        ]
        return kind(*children, **data.get("kwargs", {}))


class Stack(CompositionBlock):
    """Each child on the output of the one before it."""


class Parallel(CompositionBlock):
    """The batch repeated once per child, copy ``i`` through child ``i``."""


class MultiTask(CompositionBlock):
    """Each row through the child named by the forward argument ``task_ids`` (indices or names)."""


class Fuse(CompositionBlock):
    """AdapterFusion over the children's outputs; ``name`` is the fusion's (default: the names joined by ',')."""

    def __init__(self, *children: Child, name: str | None = None) -> None:
        super().__init__(*children)
        self._name = name

    @property
    def name(self) -> str:
        return self._name or ",".join(
            child if isinstance(child, str) else child.last() for child in self.children
        )

    def _arguments(self) -> dict[str, Any]:
        return {"name": self._name} if self._name else {}


def _sizes(block: str, field_name: str, value: Any, count: int) -> list[int]:
    sizes = [value] * count if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(sizes, (list, tuple))
        or len(sizes) != count
        or not all(isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in sizes)
    ):
        raise ConfigError(
            f"{block}({field_name}=...) takes one non-negative int per child ({count}), or one int for all, "
            f"got {value!r}"
        )
    return list(sizes)


class Split(CompositionBlock):
    """The sequence split between the children: ``splits[i]`` tokens through child ``i``."""

    def __init__(self, *children: Child, splits: list[int] | int) -> None:
        super().__init__(*children)
        self.splits = _sizes("Split", "splits", splits, len(children))

    def _arguments(self) -> dict[str, Any]:
        return {"splits": self.splits}


class BatchSplit(CompositionBlock):
    """The batch split between the children: ``batch_sizes[i]`` rows through child ``i``."""

    def __init__(self, *children: Child, batch_sizes: list[int] | int) -> None:
        super().__init__(*children)
        self.batch_sizes = _sizes("BatchSplit", "batch_sizes", batch_sizes, len(children))

    def _arguments(self) -> dict[str, Any]:
        return {"batch_sizes": self.batch_sizes}


class Average(CompositionBlock):
    """A weighted average of the children's outputs (equal weights by default)."""

    def __init__(
        self, *children: Child, weights: list[float] | None = None, normalize_weights: bool = True
    ) -> None:
        super().__init__(*children)
        if weights is None:
            weights = [1.0 / len(children)] * len(children)
        elif (
            not isinstance(weights, (list, tuple))
            or len(weights) != len(children)
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights)
        ):
            raise ConfigError(
                f"Average(weights=...) takes one number per child ({len(children)}), got {weights!r}"
            )
        elif normalize_weights:
            total = sum(weights)
            if total == 0:
                raise ConfigError(
                    f"Average(weights={list(weights)!r}) sums to 0 and cannot be normalised; give weights with a "
                    "non-zero sum, or normalize_weights=False"
                )
            weights = [w / total for w in weights]
        self.weights = [float(w) for w in weights]

    def _arguments(self) -> dict[str, Any]:
        return {"weights": self.weights}

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        # weights not summing to 1 (un-normalised, or normalised but off by rounding) must read back as they are
        if sum(self.weights) != 1.0:
            data["kwargs"]["normalize_weights"] = False
        return data


BLOCKS: dict[str, type[CompositionBlock]] = {
    kind.__name__: kind for kind in (Stack, Parallel, MultiTask, Fuse, Split, BatchSplit, Average)
}
BLOCK_NAMES = tuple(BLOCKS)
# what a layer whose adapters act on each token separately computes with AdapterLayer.composed_output's default
TOKEN_WISE_BLOCKS = tuple(name for name in BLOCK_NAMES if name != "Fuse")

# What each block may hold (AdapterHub's adapters 1.3): str is an adapter name.
ALLOWED_NESTINGS: dict[type, list[type]] = {
    Stack: [str, Fuse, Split, Parallel, BatchSplit, Average, MultiTask],
    Fuse: [str, Stack],
    Split: [str, Split, Stack, BatchSplit, Average],
    Parallel: [str, Stack, BatchSplit, Average],
    MultiTask: [str, Stack, Average, Fuse],
    BatchSplit: [str, Stack, Split, BatchSplit, Average],
    Average: [str, Stack, Split, BatchSplit],
}
ROW_BLOCKS = (BatchSplit, MultiTask, Parallel)


def validate(block: CompositionBlock, level: int = 0) -> None:
    """Check nesting as AdapterHub does: only :data:`ALLOWED_NESTINGS`, and below the second level only
    adapter names and ``Stack``."""
    if level > 1 and not isinstance(block, Stack):
        raise ConfigError(
            f"composition too deep: {block!r} sits {level} blocks down, where only adapter names and Stack may go"
        )
    allowed = ALLOWED_NESTINGS[type(block)]
    for child in block.children:
        if type(child) not in allowed:
            raise ConfigError(
                f"{type(child).__name__} cannot go inside {type(block).__name__} ({child!r} in {block!r}); "
                f"{type(block).__name__} holds {', '.join(kind.__name__ for kind in allowed)}"
            )
        if isinstance(child, CompositionBlock):
            validate(child, level + 1)


def enclosing_blocks(block: CompositionBlock) -> dict[str, set[str]]:
    """For each adapter name in ``block``, the names of the block types it sits inside."""
    found: dict[str, set[str]] = {}

    def walk(node: CompositionBlock, outer: set[str]) -> None:
        inside = outer | {type(node).__name__}
        for child in node.children:
            if isinstance(child, str):
                found.setdefault(child, set()).update(inside)
            else:
                walk(child, inside)

    walk(block, set())
    return found


def _flatten(children: list[Child]) -> list[str]:
    names = itertools.chain.from_iterable(
        [child] if isinstance(child, str) else child.flatten() for child in children
    )
    return list(dict.fromkeys(names))


def has_row_blocks(block: Child) -> bool:
    return isinstance(block, CompositionBlock) and (
        isinstance(block, ROW_BLOCKS) or any(has_row_blocks(child) for child in block.children)
    )


def fuse_blocks(block: Child | None) -> list[Fuse]:
    """Every ``Fuse`` in ``block``, outermost first."""
    if not isinstance(block, CompositionBlock):
        return []
    own = [block] if isinstance(block, Fuse) else []
    return own + [fuse for child in block.children for fuse in fuse_blocks(child)]


def parallel_channels(block: Child) -> int:
    """How many copies of the batch a ``Parallel`` in ``block`` asks for (1 when there is none)."""
    if not isinstance(block, CompositionBlock):
        return 1
    own = len(block.children) if isinstance(block, Parallel) else 1
    return max([own, *(parallel_channels(child) for child in block.children)])


# --- what a layer walks --------------------------------------------------------------------------------------
@dataclass(eq=False)
class Rows:
    """A row block resolved for one batch: ``child_of_row[r]`` is the index of the child that row ``r`` goes
    through. Index tensors are made once per device."""

    children: list[Child]
    child_of_row: list[int]
    _selected: dict = field(default_factory=dict, repr=False)

    def selected(self, child: int, device: torch.device) -> torch.Tensor:
        key = (child, device)
        if key not in self._selected:
            rows = [row for row, index in enumerate(self.child_of_row) if index == child]
            self._selected[key] = torch.tensor(rows, dtype=torch.long, device=device)
        return self._selected[key]

    def flatten(self) -> list[str]:
        return _flatten(self.children)

    @functools.cached_property
    def spans(self) -> list[tuple[int, int]] | None:
        """Each child's rows as one ``(start, stop)`` range, when they follow one another in the children's
        order (``BatchSplit``, ``Parallel``); None when rows interleave (``MultiTask``)."""
        if any(later < earlier for earlier, later in zip(self.child_of_row, self.child_of_row[1:])):
            return None
        counts = [self.child_of_row.count(index) for index in range(len(self.children))]
        starts = [sum(counts[:index]) for index in range(len(counts))]
        return [(start, start + count) for start, count in zip(starts, counts)]

    @functools.cached_property
    def row_adapters(self) -> RowAdapters | None:
        """Each row's adapter name, when every child is a plain adapter name (else None), made once per call so
        that every layer shares its groupings (see :mod:`peftkit.mixed_batch`)."""
        if not all(isinstance(child, str) for child in self.children):
            return None
        return RowAdapters([self.children[index] for index in self.child_of_row])


def resolve_rows(block: Child, rows: int, task_ids: Any = None) -> Child:
    """``block`` for one batch of ``rows`` rows (after any ``Parallel`` repeat): row blocks become :class:`Rows`."""
    if isinstance(block, str) or not has_row_blocks(block):
        return block
    if isinstance(block, Parallel):
        copies = len(block.children)
        if rows % copies:
            raise ValueError(f"{block!r} needs a batch of a multiple of {copies} rows, got {rows}")
        per_child = rows // copies
        children = [resolve_rows(child, per_child, task_ids) for child in block.children]
        return Rows(children, [index for index in range(copies) for _ in range(per_child)])
    if isinstance(block, BatchSplit):
        if sum(block.batch_sizes) != rows:
            raise ValueError(
                f"{block!r} splits {sum(block.batch_sizes)} rows, but the batch has {rows}; give batch_sizes "
                "that sum to the batch size"
            )
        children = [
            resolve_rows(child, size, task_ids) for child, size in zip(block.children, block.batch_sizes)
        ]
        return Rows(children, [index for index, size in enumerate(block.batch_sizes) for _ in range(size)])
    if isinstance(block, MultiTask):
        assignment = _task_rows(block, task_ids, rows)
        children = [
            resolve_rows(child, assignment.count(index), None) for index, child in enumerate(block.children)
        ]
        return Rows(children, assignment)
    # Stack, Average, Split: same rows for every child (Split's children see every row, some tokens)
    resolved = [resolve_rows(child, rows, task_ids) for child in block.children]
    copy = object.__new__(type(block))
    copy.__dict__.update(block.__dict__, children=resolved)
    return copy


def _task_rows(block: MultiTask, task_ids: Any, rows: int) -> list[int]:
    if task_ids is None:
        raise ValueError(
            f"{block!r} needs task_ids=: one task per row, as an index into its children or a name"
        )
    ids = task_ids.tolist() if isinstance(task_ids, torch.Tensor) else list(task_ids)
    if len(ids) != rows:
        raise ValueError(f"task_ids has {len(ids)} entries, but the batch has {rows} rows: give one per row")
    names = [child if isinstance(child, str) else child.last() for child in block.children]
    assignment = []
    for task in ids:
        if isinstance(task, str):
            if task not in names:
                raise ValueError(
                    f"task_ids names {task!r}, which is not a child of {block!r}; children: {names}"
                )
            assignment.append(names.index(task))
        elif isinstance(task, int) and 0 <= task < len(names):
            assignment.append(task)
        else:
            raise ValueError(
                f"task_ids holds {task!r}; each entry must be a child's index (0 to {len(names) - 1}) or name"
            )
    return assignment


# a layer's state: tensors sharing their first two dimensions (rows, tokens); the last one is what the
# adapters change, the others are what they read (a layer's input)
State = tuple[torch.Tensor, ...]
Step = Callable[[list[str], State], State]


def compose(
    block: Child,
    state: State,
    step: Step,
    *,
    rows_of_names: Callable[[RowAdapters, State], State] | None = None,
    fuse: Callable[[Fuse, State], State] | None = None,
    holds: Callable[[str], bool] | None = None,
    where: str = "this layer",
) -> State:
    """Walk ``block`` over ``state``; ``step(names, state)`` applies adapters in turn (a ``Stack`` of names
    comes as one call, as when they are simply all active), leaving out those the layer does not hold.
    ``rows_of_names``: a faster way to run a :class:`Rows` whose children are all adapter names (a layer's
    mixed-batch path), given the rows' names as one :class:`~peftkit.mixed_batch.RowAdapters` per call.
    ``fuse``: how the layer fuses, where it can. ``holds``: whether the layer holds an adapter; a ``Split`` of
    adapters it holds none of leaves its tokens as they are."""

    def walk(node: Child, current: State) -> State:
        if isinstance(node, str):
            return step([node], current)
        if isinstance(node, Stack) and all(isinstance(child, str) for child in node.children):
            return step(list(node.children), current)
        if isinstance(node, Stack):
            for child in node.children:
                current = walk(child, current)
            return current
        if isinstance(node, Average):
            outputs = [walk(child, current)[-1] for child in node.children]
            averaged = sum(w * out for w, out in zip(node.weights, outputs))
            rest = 1.0 - sum(node.weights)
            if rest != 0.0:  # only without normalisation: the unchanged output carries the remaining weight
                averaged = averaged + rest * current[-1]
            return (*current[:-1], averaged.to(current[-1].dtype))
        if isinstance(node, Split):
            if holds is not None and not any(holds(name) for name in _names(node)):
                return current  # none of its adapters here: no sequence to split (a pooler, a convolution)
            return _split(node, current, walk, where)
        if isinstance(node, Rows):
            return _rows(node, current, walk, rows_of_names, where)
        if isinstance(node, Fuse):
            if fuse is None:
                raise ConfigError(f"Fuse has no meaning for {where}: only methods with a fusion layer fuse")
            return fuse(node, current)
        raise ConfigError(
            f"{type(node).__name__} reached {where} unresolved; run the model through PeftModel"
        )

    return walk(block, state)


def _names(node: Any) -> list[str]:
    """The adapter names in a block, resolved (:class:`Rows`) or not."""
    return [node] if isinstance(node, str) else [name for child in node.children for name in _names(child)]


def _split(node: Split, state: State, walk: Callable, where: str) -> State:
    out = state[-1]
    if out.dim() < 3 or any(t.shape[:2] != out.shape[:2] for t in state):
        raise ConfigError(
            f"Split splits sequences, and {where} sees no (batch, sequence, ...) input and output: "
            f"shapes {[tuple(t.shape) for t in state]}"
        )
    if sum(node.splits) != out.shape[1]:
        raise ValueError(
            f"{node!r} splits {sum(node.splits)} tokens, but the sequence has {out.shape[1]}; give splits that "
            "sum to the sequence length"
        )
    parts, start = [], 0
    for child, size in zip(node.children, node.splits):
        parts.append(walk(child, tuple(t[:, start : start + size] for t in state))[-1])
        start += size
    return (*state[:-1], torch.cat(parts, dim=1))


def _rows(node: Rows, state: State, walk: Callable, rows_of_names: Callable | None, where: str) -> State:
    out = state[-1]
    if out.shape[0] != len(node.child_of_row):
        raise ValueError(
            f"the composition splits {len(node.child_of_row)} rows, but {where} sees a batch of {out.shape[0]}"
        )
    rows = node.row_adapters
    if rows is not None and rows_of_names is not None:
        return rows_of_names(rows, state)
    spans = node.spans
    if spans is not None:  # each child's rows are a slice: no gather, and the parts joined once
        parts = [
            walk(child, tuple(t[start:stop] for t in state))[-1].to(out.dtype)
            for child, (start, stop) in zip(node.children, spans)
            if stop > start
        ]
        return (*state[:-1], torch.cat(parts))
    out = out.clone()  # one copy, then each child's rows written into it
    for index, child in enumerate(node.children):
        selected = node.selected(index, out.device)
        if not len(selected):
            continue
        changed = walk(child, tuple(t.index_select(0, selected) for t in state))[-1]
        out.index_copy_(0, selected, changed.to(out.dtype))
    return (*state[:-1], out)
