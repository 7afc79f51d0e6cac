"""The hooks a peftkit plugin can implement. This file is the contract: read it first.

Every hook is named ``peftkit_*`` and documented in one template: what it decides; whether the first
non-None answer wins (firstresult) or all answers are gathered; its parameters; what returning None
means.

Per-method hooks take a ``config``. Implement them with ``@peftkit.method_impl("<method>")``: the
core then calls your implementation only for your own method's configs, so no plugin writes dispatch
code. Hooks without ``config`` (the layer hooks, commands) are answered by whoever knows the layer or
command; backends such as ``peftkit-bnb`` use them to teach the core new layer types.

Per-method hooks share three parameters: ``peft_model`` (the :class:`peftkit.PeftModel`; the base
model is ``peft_model.base_model.model``), ``config`` (the adapter's config, validated) and
``adapter_name``. Which hooks each method family implements, and why, is in ``docs/concepts.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from pathlib import Path

    import click
    import torch
    from torch import nn

    from peftkit.config import PeftConfig
    from peftkit.foreign_format import ForeignAdapter
    from peftkit.layer_access import LayerFeatures
    from peftkit.method import MethodSpec
    from peftkit.model import PeftModel

hookspec = pluggy.HookspecMarker("peftkit")


# --- registering -----------------------------------------------------------------------------------
@hookspec
def peftkit_register_methods() -> list[MethodSpec]:
    """Name the methods this plugin provides.

    All answers are gathered. Two plugins that claim one method name or one ``peft_type`` are an error
    that names both.

    :return: a list of :class:`peftkit.MethodSpec`; None (or an empty list) when the plugin provides no
        method, as backends and command plugins do.
    """


# --- injecting -------------------------------------------------------------------------------------
@hookspec(firstresult=True)
def peftkit_inject_adapter(peft_model: PeftModel, config: PeftConfig, adapter_name: str) -> bool | None:
    """Put the adapter ``adapter_name`` of the config's method onto the model.

    firstresult: the owning method answers. Layer methods call
    :func:`peftkit.injection.inject_into_targets`, which matches ``target_modules`` and wraps each
    match in the method's :class:`peftkit.AdapterLayer`; prompt methods add their prompt module to
    ``peft_model.prompt_modules``. Parameters of a new adapter start frozen; freezing decides later.

    :param peft_model: the model being adapted; the base model is ``peft_model.base_model.model``.
    :param config: the adapter's config, already validated.
    :param adapter_name: a name not yet used on this model.
    :return: True once injected; None when the config is not this plugin's method.
    """


@hookspec(firstresult=True)
def peftkit_remove_adapter(peft_model: PeftModel, config: PeftConfig, adapter_name: str) -> bool | None:
    """Take the adapter's non-layer state off the model (``delete_adapter``).

    firstresult. The core already removes the adapter from every :class:`peftkit.AdapterLayer` and its
    module from ``peft_model.prompt_modules``; implement this only for state kept elsewhere.

    :return: True when done; None when there was nothing of this method to remove.
    """


@hookspec(firstresult=True)
def peftkit_transform_inputs(
    peft_model: PeftModel, config: PeftConfig, adapter_name: str, inputs: dict[str, Any]
) -> dict[str, Any] | None:
    """Rewrite the keyword arguments of one forward call of the base model.

    firstresult. Called for each active adapter, in activation order, before the base model runs.
    Prompt methods prepend virtual tokens here and extend ``attention_mask`` and ``labels``.

    :param inputs: the keyword arguments the user passed (positional ones already named).
    :return: the new keyword arguments; None to leave them as they are.
    """


@hookspec(firstresult=True)
def peftkit_prepare_generation(
    peft_model: PeftModel, config: PeftConfig, adapter_name: str, inputs: dict[str, Any]
) -> dict[str, Any] | None:
    """Rewrite the keyword arguments of one ``generate()`` call of the base model.

    firstresult. Like :func:`peftkit_transform_inputs`, but the result goes to ``generate``, which
    runs the KV cache itself: the prompt must be seen by the first step only.

    :param inputs: the keyword arguments the user passed to ``generate`` (positional ones already named).
    :return: the new keyword arguments; None to leave them as they are.
    """


@hookspec(firstresult=True)
def peftkit_prepare_generation_step(
    peft_model: PeftModel, config: PeftConfig, adapter_name: str, model_inputs: dict[str, Any]
) -> dict[str, Any] | None:
    """Rewrite the keyword arguments of one step of ``generate()``, just before the base model runs it.

    firstresult. Called for each active adapter, in activation order, on what the base model's
    ``prepare_inputs_for_generation`` made for this step: the prompt step (empty KV cache), then one
    step per new token. Prompt methods for decoder-only models prepend their virtual tokens at the
    prompt step and extend ``attention_mask`` at every step, as PEFT does.

    :param model_inputs: the keyword arguments of the base model's forward for this step.
    :return: the new keyword arguments; None to leave them as they are.
    """


@hookspec(firstresult=True)
def peftkit_transform_outputs(
    peft_model: PeftModel, config: PeftConfig, adapter_name: str, inputs: dict[str, Any], outputs: Any
) -> Any | None:
    """Rewrite what one forward call of the base model returned.

    firstresult. Called for each active adapter, in activation order, after the base model ran.
    AdaLoRA adds its orthogonality regulariser to ``outputs.loss`` here while training.

    :param inputs: the keyword arguments the base model was called with (after
        :func:`peftkit_transform_inputs`).
    :param outputs: what the base model returned (or the previous adapter's rewrite of it).
    :return: the new outputs; None to leave them as they are.
    """


# --- initialising from data ------------------------------------------------------------------------
@hookspec(firstresult=True)
def peftkit_initialize_from_data(
    peft_model: PeftModel,
    config: PeftConfig,
    adapter_name: str,
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any],
    show_progress: bool,
    options: dict[str, Any],
) -> bool | None:
    """Initialise an injected adapter from what the model computes on data (LoRA's EVA).

    firstresult: the owning method answers. Called by :func:`peftkit.initialize_from_data` after the
    adapter was injected with its config's data-driven init. Run batches through the model with
    ``forward``, read what the method needs (layer inputs, activations, gradients), and set the adapter's
    tensors; the adapter may change shape (ranks), and then its config must say so (``rank_pattern``), so
    that the adapter saves and loads as a plain one of its method. Raise a ``ValueError`` naming the adapter
    when its config asks for no data-driven init.

    :param batches: an iterable of model inputs (a dataloader); it may be iterated more than once.
    :param forward: runs one batch through the model: ``forward(peft_model, batch)``.
    :param show_progress: whether to show a progress bar for the pass over the data.
    :param options: the method's own keyword arguments (EVA's ``prepare_model_inputs_fn``, ...); raise a
        ``TypeError`` naming any that the method does not take.
    :return: True once initialised; None when the config is not this plugin's method, or the method has no
        data-driven initialisation (the core then says so).
    """


# --- freezing --------------------------------------------------------------------------------------
@hookspec
def peftkit_trainable_parameters(
    peft_model: PeftModel, config: PeftConfig, adapter_name: str
) -> list[tuple[str, torch.nn.Parameter]] | None:
    """Name the parameters that train with an active adapter, beyond its own layers' tensors.

    All answers are gathered. The core already makes trainable the adapter's tensors in every
    :class:`peftkit.AdapterLayer` and its ``modules_to_save`` copies, and freezes everything else.
    LoRA answers its ``bias`` choice here. A prompt module in ``peft_model.prompt_modules`` trains
    whole without this hook.

    :return: ``(name, parameter)`` pairs; None when the method trains nothing more.
    """


@hookspec
def peftkit_on_optimizer_step(
    peft_model: PeftModel, config: PeftConfig, adapter_name: str, global_step: int
) -> None:
    """React to one optimizer step of training: after ``optimizer.step()``, before gradients are zeroed.

    All implementations run. :meth:`peftkit.PeftModel.update_and_allocate` (PEFT's name, also reachable as
    ``model.base_model.update_and_allocate``) calls this for every adapter; a transformers ``Trainer``
    reaches it through a callback. AdaLoRA scores its singular values here and prunes ranks on its budget
    schedule.

    :param global_step: the number of optimizer steps taken so far, counting this one from 0 as PEFT does.
    :return: None always.
    """


# --- merging ---------------------------------------------------------------------------------------
@hookspec(firstresult=True)
def peftkit_merge_adapter(peft_model: PeftModel, config: PeftConfig, adapter_name: str) -> bool | None:
    """Fold the adapter into the base weights.

    firstresult. The core's default, run last, merges every :class:`peftkit.AdapterLayer` holding the
    adapter through :meth:`AdapterLayer.merge`. A method whose spec says ``mergeable=False`` never gets
    here: the core raises :class:`peftkit.MergeNotSupportedError` first.

    :return: True when merged; None to leave it to the core's default.
    """


@hookspec(firstresult=True)
def peftkit_unmerge_adapter(peft_model: PeftModel, config: PeftConfig, adapter_name: str) -> bool | None:
    """Take a merged adapter out of the base weights again.

    firstresult, with a default in the core like :func:`peftkit_merge_adapter`.

    :return: True when unmerged; None to leave it to the core's default.
    """


# --- composing -------------------------------------------------------------------------------------
@hookspec(firstresult=True)
def peftkit_composition_blocks(peft_model: PeftModel, config: PeftConfig, adapter_name: str) -> Collection[str] | None:
    """Name the composition blocks (:mod:`peftkit.composition`) an adapter of this method may sit inside.

    firstresult: the owning method answers. ``set_adapter`` checks every block it is given against the
    answers, and refuses, naming the method and what it supports, a block that means nothing for an
    adapter in it. How the adapter's layers then compute a block: :meth:`peftkit.AdapterLayer.composed_output`
    (a default that fits layers acting on each token separately) and :meth:`~peftkit.AdapterLayer.check_composition`.

    :return: names from ``peftkit.composition.BLOCK_NAMES`` (``"Stack"``, ``"Average"``, ...); None for the
        core's default: the blocks that every layer holding the adapter computes (its class's
        ``AdapterLayer.composition_blocks``), or ``Stack`` alone for an adapter without layers (a prompt,
        which then joins the adapters stacked with it).
    """


# --- serialising -----------------------------------------------------------------------------------
@hookspec
def peftkit_adapter_state_dict(
    peft_model: PeftModel, config: PeftConfig, adapter_name: str
) -> dict[str, torch.Tensor] | None:
    """Give the adapter's tensors that live outside its layers, under PEFT's key names.

    All answers are gathered into one file with the core's part: the tensors of every
    :class:`peftkit.AdapterLayer` (keys ``<key_root><module path>.<tensor>``, adapter name left out, as
    PEFT saves them). Prompt methods answer ``{"prompt_embeddings": ...}``; LoRA its trained biases.

    :return: a dict of key to tensor; None when the method has nothing outside its layers.
    """


@hookspec
def peftkit_load_adapter_state_dict(
    peft_model: PeftModel, config: PeftConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> list[str] | None:
    """Load the adapter's tensors that live outside its layers.

    All answers are gathered. ``state_dict`` holds the keys the core did not place in a layer; a key
    no plugin takes is an error. Check shapes before copying and raise
    :class:`peftkit.AdapterLoadError` naming the tensor and both shapes.

    :param state_dict: saved key to tensor, PEFT's key names.
    :return: the keys taken; None when the method keeps nothing outside its layers.
    """


@hookspec(firstresult=True)
def peftkit_read_foreign_adapter(folder: Path, model: nn.Module | None) -> ForeignAdapter | None:
    """Read an adapter folder saved in another library's format (AdapterHub's ``save_adapter``, ...).

    firstresult: the plugin that recognises the folder's format answers. The core asks only for folders
    that are not PEFT's (no ``adapter_config.json`` with a ``peft_type``): ``PeftModel.from_pretrained``
    and ``load_adapter`` with the base model, ``peftkit inspect`` without one. Read tensor files without
    executing code (safetensors, or ``torch.load(..., weights_only=True)``). Raise
    :class:`peftkit.AdapterLoadError` naming the file and the setting where the folder is in the format but
    holds what the method cannot represent.

    :param folder: an existing folder.
    :param model: the base model to load the adapter onto (adapters of other methods may already wrap
        some of its layers); None when only describing the folder.
    :return: a :class:`peftkit.foreign_format.ForeignAdapter`, with ``config`` and ``tensors`` (PEFT's keys
        for ``model``) set when ``model`` is given; None when the folder is not in a format this plugin reads.
    """


@hookspec(firstresult=True)
def peftkit_save_foreign_adapter(
    peft_model: PeftModel, config: PeftConfig, adapter_name: str, format: str, folder: Path
) -> bool | None:
    """Write the adapter in another library's format (``save_pretrained(folder, format=...)``).

    firstresult: the owning method answers, for the formats it writes. ``folder`` is a fresh staging
    folder that the core moves into place once every adapter is written, so a failed save leaves nothing
    behind. Raise :class:`peftkit.ConfigError` naming the setting where the adapter holds what the
    format cannot.

    :param format: the format's name, as :class:`peftkit.foreign_format.ForeignAdapter` names it when read.
    :param folder: the (empty) folder to write this adapter's files into.
    :return: True once written; None when this method does not write ``format``.
    """


# --- layers ----------------------------------------------------------------------------------------
@hookspec(firstresult=True)
def peftkit_layer_features(layer: nn.Module) -> LayerFeatures | None:
    """Describe a base layer a method may adapt: its kind and its input and output sizes.

    firstresult: the plugin that knows the layer type answers. The core knows ``nn.Linear``,
    ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Embedding`` and transformers' ``Conv1D``.

    :param layer: the innermost base layer (never a peftkit adapter layer).
    :return: a :class:`peftkit.LayerFeatures`; None for a layer type this plugin does not know.
    """


@hookspec(firstresult=True)
def peftkit_read_weight(layer: nn.Module) -> torch.Tensor | None:
    """Read a base layer's dense weight, in the layout ``nn.Linear`` and ``nn.Conv*`` use.

    firstresult. ``(out, in)`` for linear kinds (transformers' ``Conv1D`` is transposed for you),
    ``(out, in, *kernel)`` for convolutions, ``(num_embeddings, dim)`` for embeddings. A quantized
    layer dequantizes here.

    :param layer: the innermost base layer.
    :return: the weight (a new tensor or a view); None for a layer type this plugin does not know.
    """


@hookspec(firstresult=True)
def peftkit_write_weight(layer: nn.Module, weight: torch.Tensor) -> bool | None:
    """Write a dense weight, in the layout of :func:`peftkit_read_weight`, back into a base layer.

    firstresult. A quantized layer requantizes here.

    :param layer: the innermost base layer.
    :param weight: the new dense weight, same shape as :func:`peftkit_read_weight` gave.
    :return: True when written; None for a layer type this plugin does not know.
    """


@hookspec
def peftkit_prepare_base_layer(layer: nn.Module) -> None:
    """Make a base layer ready to carry adapters, when an adapter layer is made around it.

    All implementations run, each for the layer types it knows: a backend puts its layer in the state
    adapters train on and compute with exactly (peftkit-bnb keeps a 4-bit layer out of bitsandbytes'
    packed CPU layout, whose kernel has no backward). Called for every adapter layer made around the
    layer, so it must do nothing the second time.

    :param layer: the innermost base layer (never a peftkit adapter layer).
    :return: None; what an implementation returns is ignored.
    """


@hookspec(firstresult=True)
def peftkit_dense_layer(layer: nn.Module, dtype: torch.dtype | None) -> nn.Module | None:
    """Give a full-precision replacement for a quantized base layer (``merge_and_unload(dequantize=True)``).

    firstresult: the backend that knows the layer type answers. The replacement computes what the layer
    computes, from its dequantized weight and its bias: an ``nn.Linear`` for a quantized linear layer.
    The core replaces the layer before merging, so adapters merge into the dense weight exactly.

    :param layer: a base layer of the model (never a peftkit adapter layer).
    :param dtype: the replacement's dtype; None for the layer's compute dtype.
    :return: the replacement module; None for a layer that is not quantized or not this plugin's type.
    """


# --- compiling -------------------------------------------------------------------------------------
@hookspec(firstresult=True)
def peftkit_prepare_compiled_hotswap(
    peft_model: PeftModel, config: PeftConfig, adapter_name: str, target_rank: int | None
) -> bool | None:
    """Make the adapter ready to be hot-swapped in a compiled model without recompiling.

    firstresult. Called by :func:`peftkit.prepare_model_for_compiled_hotswap` for every adapter of the
    model, before it is compiled. Afterwards, :func:`peftkit.hotswap_adapter` of any adapter that the
    method accepts in this one's place must change no tensor's shape, dtype or device, and no Python value
    that the forward reads: pad tensors to the largest shape to come, turn scalars that a swap changes
    into tensors written in place, and let the layers' ``hotswap_fields_of`` allow what may now differ.
    Check everything before changing anything, and raise a ``ValueError`` that names the adapter, the
    layer and the limit where the adapter cannot be prepared.

    :param target_rank: the largest rank that an adapter swapped in will have (for low-rank methods);
        None to keep the ranks as they are.
    :return: True when prepared; None when the config is not this plugin's method, or the method cannot
        be prepared (the core then names it in its error, if no adapter could be prepared).
    """


# --- model methods ---------------------------------------------------------------------------------
@hookspec
def peftkit_model_methods() -> dict[str, Callable[..., Any]] | None:
    """Add methods to :class:`peftkit.PeftModel`, as PEFT's per-method models add theirs.

    All answers are gathered. ``model.<name>(*args, **kwargs)`` calls ``function(model, *args, **kwargs)``
    when ``PeftModel`` itself has no attribute ``<name>``; LoRA adds ``add_weighted_adapter`` this way.
    Two plugins that add one name are an error that names both.

    :return: a dict of method name to function taking the ``PeftModel`` first; None when the plugin adds none.
    """


# --- commands --------------------------------------------------------------------------------------
@hookspec
def peftkit_register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``peftkit`` command line.

    All implementations run, once per CLI run, when the CLI first needs a command it does not know (or
    lists them, as ``--help`` does). Implement it in a module of its own, light to import (click, not
    torch), and name that module in the ``peftkit.commands`` entry-point group, under the same name as
    the plugin's ``peftkit`` entry point: the CLI imports those modules, never the method plugins, to
    find commands. Plugin objects registered in-process (``peftkit.plugins.register``) are asked too.

    :param cli: the top-level click group; call ``cli.add_command(...)`` or decorate with ``cli.command``.
    :return: None always.
    """
