"""Batches whose rows use different adapters: PEFT's ``model(..., adapter_names=[...])``.

One name per row (sample), ``"__base__"`` for a row that runs the base model. For the length of the call
every adapter layer holds a :class:`RowAdapters`; a layer adds to each row its own adapter's output and
leaves base rows alone. A method may do that for all rows at once with batched matmuls over a
:class:`Grouping` of the tokens by adapter (LoRA does); any other layer falls back to running each
adapter on its rows (:meth:`peftkit.AdapterLayer.mixed_batch_output`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

BASE = "__base__"
# families whose layers act on each row separately; prompts change the input sequence itself
ROW_WISE_FAMILIES = ("weight-delta", "activation-scaling", "bias-only")


@dataclass(frozen=True)
class Grouping:
    """The tokens of a flattened batch arranged by adapter, each group padded to the largest, ``width``.

    ``gather`` lists, for each of the ``adapters × width`` places, the token that goes there, or
    ``tokens`` (one past the last token: a zero row appended to the input) for padding. So
    ``cat([x, 0]).index_select(0, gather).view(adapters, width, features)`` is the input ready for
    ``torch.bmm`` against the adapters' stacked weights: each adapter's weights are read once, not per
    row. ``scatter`` maps back: for each token, its place in the flattened result, or
    ``adapters × width`` (a zero row appended) where the token's row has no adapter in this layer.

    ``in_order``: the tokens are already arranged so (every token has an adapter here, each adapter's tokens
    come together, in ``held``'s order, as many for each): the input is its own grouping, a ``view``.
    """

    gather: torch.Tensor
    scatter: torch.Tensor
    adapters: int
    width: int
    in_order: bool = False

@dataclass
class RowAdapters:
    names: list[str]
    _adapters: list[str] | None = field(default=None, repr=False)
    _row_indices: dict = field(default_factory=dict, repr=False)
    _groupings: dict = field(default_factory=dict, repr=False)

    def adapters(self) -> list[str]:
        """The adapter names used, in order of first appearance, without ``__base__``."""
        if self._adapters is None:
            self._adapters = [name for name in dict.fromkeys(self.names) if name != BASE]
        return self._adapters

    def check_rows(self, rows: int, where: str) -> None:
        if rows != len(self.names):
            raise ValueError(
                f"adapter_names has {len(self.names)} names, but {where} sees a batch of {rows} rows: give "
                "one name per row (with generate, one per input sequence, and no beam search)"
            )

    def row_index(self, held: tuple[str, ...], device: torch.device) -> torch.Tensor:
        """Per row, the index of its adapter in ``held``, or -1 (a base row, or an adapter not held)."""
        key = (held, device)
        if key not in self._row_indices:
            position = {name: index for index, name in enumerate(held)}
            self._row_indices[key] = torch.tensor([position.get(name, -1) for name in self.names], device=device)
        return self._row_indices[key]

    def grouping(self, held: tuple[str, ...], tokens_per_row: int, device: torch.device) -> Grouping:
        """The grouping for a layer that holds the adapters ``held``; computed once per call and layout."""
        key = (held, tokens_per_row, device)
        if key not in self._groupings:
            per_token = self.row_index(held, device).repeat_interleave(tokens_per_row)
            tokens = (per_token >= 0).nonzero().flatten()
            adapter = per_token[tokens]
            counts = torch.bincount(adapter, minlength=len(held))
            width = int(counts.max()) if len(adapter) else 0
            order = torch.argsort(adapter, stable=True)
            starts = counts.cumsum(0) - counts
            place = torch.empty_like(adapter)
            place[order] = torch.arange(len(adapter), device=device) - starts[adapter[order]]
            place += adapter * width
            gather = torch.full((len(held) * width,), len(per_token), dtype=torch.long, device=device)
            gather[place] = tokens
            scatter = torch.full((len(per_token),), len(held) * width, dtype=torch.long, device=device)
            scatter[tokens] = place
            in_order = len(gather) == len(per_token) and bool(
                torch.equal(gather, torch.arange(len(gather), device=device))
            )
            self._groupings[key] = Grouping(gather, scatter, len(held), width, in_order)
        return self._groupings[key]


@contextlib.contextmanager
def rows_using(
    layers: list, names: list[str], layouts: Iterable[tuple[tuple[str, ...], torch.device]] = ()
) -> Iterator[RowAdapters]:
    """Give every adapter layer the batch's per-row adapter names for the length of one call.

    ``layouts``: the ``(adapters held, device)`` of the layers, whose :meth:`RowAdapters.row_index` is made
    here, before any layer runs. A compiled layer then reads it as a tensor, and a batch naming other
    adapters changes no guard (computed inside the graph, it would specialise on the names)."""
    rows = RowAdapters(list(names))
    for held, device in layouts:
        rows.row_index(held, device)
    for layer in layers:
        layer.row_adapters = rows
    try:
        yield rows
    finally:
        for layer in layers:
            layer.row_adapters = None
