"""Grouped down-projections for sibling LoRA layers: one product ``x [A_q; A_k; A_v]ᵀ`` for q, k and v.

*Siblings* are LoRA layers called one after another with the very same input tensor: q, k and v of an
attention block read one tensor of hidden states, and so do gate and up of a gated MLP. Instead of one
thin product ``x Aᵀ`` each, the first of them computes all their down-projections with one product
(:class:`peftkit_lora.fused.GroupedDown`, which also gives ∂x and every ∂A from one product each in
backward), and each layer adds its own update from its columns.

**Opt-in**: ``LoraLayer.group_siblings = True`` turns it on for every LoRA layer of the process. It
is off by default because on CPU it measured no faster: one ``(N, 3r)`` product costs what three
``(N, r)`` products do there, for a training step as for inference (``python -m benchmarks.run``
reports the ratio). Where many small kernel launches are the cost, as on a GPU at small batch, it
launches fewer. Outputs and gradients agree with the per-layer path's to rounding: a product's
columns and the A's gradients are summed over the same inputs, perhaps in another order.

**Finding them by watching.** Which layers share an input is learnt at run time, per thread: the run
of LoRA calls that got one tensor (the same object, its version counter unchanged) is remembered, when
a call with another tensor closes it, for the run's first layer, its *leader*. The next time the
leader is called it computes the down-projections of itself and of every remembered sibling that can
take one, and leaves the siblings' columns here, tagged with that input. A sibling takes its own when
it is called with the same tensor, unchanged; the last one taken, nothing is held. So a model's first
forward learns and the ones after it group; a changed pattern of calls is learnt again by the next.

The model's structure would not do: a parent module does not say which of its layers read one input
(``o_proj`` has q's parent and q's input width, but reads the attention output), and names are a
habit, not a rule. Watching needs neither, and a wrong guess costs only time: a sibling called with
another tensor, in another order, or not at all computes its own down-projection.

**Which layers group**: those running one unmerged adapter through the fused node (a linear layer, no
DoRA, a dtype the node computes in, see ``LoraLayer._groupable``), with no dropout in effect (PEFT
draws an independent mask per layer, which one shared product cannot give), with no forward hooks on
them or their base layers (a hook may swap the weights, as FSDP's do) and outside mixed batches.
Every other call is left to the per-layer path, as are whole passes:

- under ``torch.compile``: dynamo traces neither weak references nor version counters, and a
  remembered group read in a compiled forward would become a guard, so learning one would recompile.
  Compiled, every layer traces its own node, and the compiler is free to fuse;
- while saved-tensor hooks are on with gradients (non-reentrant activation checkpointing, offloading
  to the CPU): checkpointing recomputes a block in backward and must save what its first pass saved,
  and a group may have been learnt in between;
- with inference tensors (``torch.inference_mode``): they have no version counter, so a change made in
  place between two siblings could not be seen.
"""

from __future__ import annotations

import threading
import weakref

import torch

from peftkit_lora import fused

_saved_tensor_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def may_group(x: torch.Tensor) -> bool:
    """Whether a call with this input may share a grouped down-projection at all (see the module's notes)."""
    if torch.compiler.is_compiling() or x.is_inference():
        return False
    return not torch.is_grad_enabled() or (
        _saved_tensor_hooks is not None and _saved_tensor_hooks(False) is None
    )


class _Group:
    """A leader's remembered siblings (weak references, the leader first), and the A's they last stacked."""

    __slots__ = ("members", "stack", "stack_key")

    def __init__(self, members: tuple[weakref.ref, ...]) -> None:
        self.members = members
        self.stack: torch.Tensor | None = None
        self.stack_key: tuple | None = None

    def stacked(self, factors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """``[A₁; A₂; …]`` in ``dtype``, kept while the same tensors hold the same values (an optimizer step, a
        load or a hot-swap bumps a version; ``.to()`` gives new storage), so inference stacks them once."""
        key = self.stack_key
        if (
            key is not None
            and key[0] == dtype
            and len(key[1]) == len(factors)
            and all(
                ref() is factor and version == factor._version and pointer == factor.data_ptr()
                for (ref, version, pointer), factor in zip(key[1], factors)
            )
        ):
            return self.stack
        self.stack = fused.stack_factors(factors, dtype)
        self.stack_key = (dtype, tuple((weakref.ref(f), f._version, f.data_ptr()) for f in factors))
        return self.stack


class _Piece(tuple):
    """A sibling's columns of a grouped down-projection, and what they were computed from."""

    __slots__ = ()

    def fits(self, factor: torch.Tensor, dtype: torch.dtype) -> bool:
        down, made_from, version, made_in, grad = self
        return (
            made_from is factor
            and version == factor._version
            and made_in == dtype
            and grad == torch.is_grad_enabled()
        )


class _Run:
    """The LoRA calls of one thread since its last change of input: which layers, and their pieces."""

    __slots__ = ("x", "version", "layers", "seen", "pieces")

    def __init__(self, x: torch.Tensor, layer) -> None:
        self.x = weakref.ref(x)
        self.version = x._version
        self.layers = [weakref.ref(layer)]
        self.seen = {id(layer)}
        self.pieces: dict[int, _Piece] = {}

    def continues_with(self, x: torch.Tensor, layer) -> bool:
        return self.x() is x and self.version == x._version and id(layer) not in self.seen


# leader → its remembered group; weak keys, so that a model's layers are not kept alive here
_groups: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_local = threading.local()


def shared_down(layer, factor: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """The down-projection ``x Aᵀ`` of ``layer`` (``factor``: its A; ``dtype``: the one it computes in) from
    a product grouped with its siblings', or None: then it computes its own.

    The caller checked :func:`may_group` and that ``layer`` can take a piece (``LoraLayer._groupable``)."""
    run = getattr(_local, "run", None)
    if run is not None and run.continues_with(x, layer):
        run.layers.append(weakref.ref(layer))
        run.seen.add(id(layer))
        piece = run.pieces.pop(id(layer), None)
        return piece[0] if piece is not None and piece.fits(factor, dtype) else None
    if run is not None:
        _remember(run)
    _local.run = run = _Run(x, layer)
    group = _groups.get(layer)
    return _lead(run, group, layer, factor, x, dtype) if group is not None else None


def _lead(run: _Run, group: _Group, layer, factor: torch.Tensor, x: torch.Tensor, dtype: torch.dtype):
    """Compute the leader's and its siblings' down-projections in one product; leave the siblings' pieces."""
    members = [(layer, factor)]
    for ref in group.members[1:]:
        sibling = ref()
        groupable = sibling._groupable(x) if sibling is not None and sibling is not layer else None
        if groupable is not None and groupable[1] == dtype:
            members.append((sibling, groupable[0]))
    if len(members) < 2:
        return None
    factors = [f for _, f in members]
    downs = fused.grouped_down(x, factors, group.stacked(factors, dtype))
    grad = torch.is_grad_enabled()
    run.pieces = {
        id(sibling): _Piece((down, f, f._version, dtype, grad))
        for (sibling, f), down in zip(members[1:], downs[1:])
    }
    return downs[0]


def _remember(run: _Run) -> None:
    """Learn from a closed run: a run of several layers is its leader's group; a leader alone forgets its group."""
    layers = [ref() for ref in run.layers]
    if any(layer is None for layer in layers):
        return
    leader = layers[0]
    if len(layers) == 1:
        _groups.pop(leader, None)
        return
    group = _groups.get(leader)
    if group is None or group.members != tuple(run.layers):
        _groups[leader] = _Group(tuple(run.layers))
    for sibling in layers[1:]:
        _groups.pop(sibling, None)


def forget() -> None:
    """Drop what this thread's current run holds and every remembered group (tests start from nothing)."""
    _local.run = None
    _groups.clear()
