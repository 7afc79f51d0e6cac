"""The user's model: a base model with named adapters of any installed method, under PEFT's API."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit import plugins, serialization
from peftkit.adapter_layer import AdapterLayer, adapter_layers
from peftkit.adapter_swap import swap_adapter
from peftkit.composition import CompositionBlock, has_row_blocks, parallel_channels, resolve_rows, validate
from peftkit.config import CONFIG_NAME, PeftConfig, with_task_heads
from peftkit.errors import AdapterNameError, ConfigError, MergeNotSupportedError
from peftkit.foreign_format import PEFT_FORMAT, read_foreign_adapter
from peftkit.forward_signature import forward_with_base_signature
from peftkit.integrations.plain_trainer import warn_on_plain_trainer_save
from peftkit.modules_to_save import ModulesToSaveWrapper, wrap_modules_to_save
from peftkit.serialization import load_config  # defined there, below this module; kept importable from here


class AdaptedModel(nn.Module):
    """Holds the base model as ``.model``, so parameter paths read ``base_model.model.<path>`` as in PEFT."""

    def __init__(self, model: nn.Module, on_optimizer_step: Any = None) -> None:
        super().__init__()
        self.model = model
        self._on_optimizer_step = on_optimizer_step

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def update_and_allocate(self, global_step: int) -> None:
        """PEFT's spelling for training loops written against it: ``model.base_model.update_and_allocate(i)``."""
        self._on_optimizer_step(global_step)


def _not_traced(reason: str):
    """``torch.compiler.disable(recursive=False)`` with the reason ``fullgraph=True`` reports (torch >= 2.8;
    older torch, which takes no reason, reports dynamo's own)."""
    try:
        return torch.compiler.disable(recursive=False, reason=reason)
    except TypeError:
        return torch.compiler.disable(recursive=False)


class PeftModel(nn.Module):
    """A base model with adapters. Call it, ``generate`` with it and save it as you would the base model."""

    # transformers' Trainer refuses a quantized model that carries no adapters, and reads "carries adapters"
    # from PEFT's class or from this flag of its own PEFT integration; a PeftModel always carries them
    _hf_peft_config_loaded = True

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
    ) -> None:
        super().__init__()
        self.base_model = AdaptedModel(model, on_optimizer_step=self.update_and_allocate)
        # prompt methods keep their per-adapter modules here; like layer tensors they train, and go, with it
        self.prompt_modules = nn.ModuleDict()
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapters: list[str] = []
        self.active_composition: CompositionBlock | None = None  # what set_adapter got, when a block
        self.autocast_adapter_dtype = autocast_adapter_dtype
        self._adapters_disabled = False
        self.register_state_dict_pre_hook(warn_on_plain_trainer_save)
        self.add_adapter(adapter_name, peft_config)
        self.set_adapter(adapter_name)

    # --- plumbing -----------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "prompt_modules"):
                raise
            added = None if name.startswith("_") else plugins.model_method(name)
            if added is not None:
                return functools.partial(added, self)
            return getattr(self.base_model.model, name)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    @property
    def active_adapter(self) -> str:
        return self.active_adapters[0]

    def adapter_layers(self) -> list[tuple[str, AdapterLayer]]:
        return adapter_layers(self.base_model.model)

    def _method(self, adapter_name: str):
        return plugins.method_for_config(self.peft_config[adapter_name])

    def _check_known(self, names: list[str]) -> None:
        for name in names:
            if name not in self.peft_config:
                raise AdapterNameError(
                    f"no adapter named {name!r}; this model has {sorted(self.peft_config)}"
                )

    # --- adapters ---------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        """Inject a new adapter. It is not activated: call :meth:`set_adapter` for that, as in PEFT."""
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise AdapterNameError(
                f"adapter names must be non-empty strings without '.', got {adapter_name!r}"
            )
        if adapter_name in self.peft_config:
            raise AdapterNameError(f"this model already has an adapter named {adapter_name!r}")
        if not isinstance(peft_config, PeftConfig):
            raise ConfigError(
                f"expected a peftkit config (such as LoraConfig), got {type(peft_config).__name__}"
            )
        config = with_task_heads(copy.deepcopy(peft_config))
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(self.base_model.model, "name_or_path", None) or None
        spec = plugins.method_for_config(config)
        if not config.peft_type:
            config.peft_type = spec.peft_type
        self.peft_config[adapter_name] = config
        try:
            if not plugins.inject_adapter(self, config, adapter_name):
                raise RuntimeError(
                    f"the plugin for {spec.name!r} did not inject the adapter (no hook answered)"
                )
            wrap_modules_to_save(self.base_model.model, config.modules_to_save, adapter_name)
        except BaseException:
            self._remove(adapter_name)
            raise
        self._cast_adapter(adapter_name)
        self.__dict__["_adapter_layout"] = object()
        self._update_trainable()

    def _cast_adapter(self, adapter_name: str) -> None:
        """PEFT's ``autocast_adapter_dtype``: on, half-precision adapter tensors train in float32; off,
        adapter tensors take their base layer's floating dtype."""
        for _, layer in self.adapter_layers():
            if isinstance(layer, ModulesToSaveWrapper):
                continue  # a head's trainable copy keeps the head's dtype
            reference = next(layer.get_base_layer().parameters(), None)
            base_dtype = reference.dtype if reference is not None else None
            for _, param in layer.adapter_parameters(adapter_name):
                if not param.is_floating_point():
                    continue
                if self.autocast_adapter_dtype:
                    if param.dtype in (torch.float16, torch.bfloat16):
                        param.data = param.data.float()
                elif base_dtype is not None and base_dtype.is_floating_point:
                    param.data = param.data.to(base_dtype)

    def set_adapter(self, adapter_name: str | list[str] | CompositionBlock) -> None:
        """Activate one adapter, several at once (their effects add up), or a composition block
        (:mod:`peftkit.composition`: ``Stack("a", "b")``, ``Average(...)``, ``BatchSplit(...)``, ...)."""
        block = adapter_name if isinstance(adapter_name, CompositionBlock) else None
        if block is not None:
            names = self._composition_names(block)
        else:
            names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if not names:
            raise AdapterNameError("set_adapter needs at least one adapter name")
        self._check_known(names)
        exclusive = [name for name in names if not self._method(name).supports_multiple_active]
        if len(exclusive) > 1:
            kinds = ", ".join(f"{name!r} ({self._method(name).name})" for name in exclusive)
            raise ConfigError(
                f"adapters {kinds} cannot be active together: each one's method allows no other such adapter "
                "beside it (one prompt at a time); any number of layer adapters may join one of them"
            )
        layers, _ = self._cached_adapter_layers()
        if block is not None:
            self._check_composition(block, names, layers)
        self.active_adapters = names
        self.active_composition = block
        for layer in layers:
            layer.set_active(names)
            layer.active_composition = block
        self._note_answering()
        self._update_trainable()

    def _composition_names(self, block: CompositionBlock) -> list[str]:
        """The adapters a block activates, checked in the order that names the first thing wrong: its nesting,
        its names, whether each adapter's method takes part in the blocks around it, the fusions it runs."""
        from peftkit.composition import enclosing_blocks

        validate(block)
        self._check_known(block.flatten())
        layers, _ = self._cached_adapter_layers()  # walked once, not once per adapter
        for name, inside in enclosing_blocks(block).items():
            supported = plugins.composition_blocks(self, self.peft_config[name], name, layers)
            refused = sorted(inside - supported)
            if refused:
                method = self._method(name).name
                can = ", ".join(sorted(supported)) or "none"
                raise ConfigError(
                    f"adapter {name!r} is a {method} adapter, which cannot take part in {', '.join(refused)} "
                    f"(in {block!r}); {method} adapters take part in: {can}"
                )
        return block.flatten() + self._fusions_of(block)

    def _fusions_of(self, block: CompositionBlock) -> list[str]:
        """The adapters that the ``Fuse`` blocks in ``block`` run: each the fusion adapter named as the block
        (``Fuse("a", "b")``: ``"a,b"``, AdapterHub's name)."""
        from peftkit.composition import fuse_blocks

        names = []
        for fuse in fuse_blocks(block):
            if fuse.name not in self.peft_config:
                raise AdapterNameError(
                    f"{fuse!r} runs the fusion adapter {fuse.name!r}, and this model has none by that name; add "
                    "it first (peftkit-bottleneck: model.add_adapter_fusion([...]) or load_adapter(fusion folder)). "
                    f"Adapters: {sorted(self.peft_config)}"
                )
            fused = [child if isinstance(child, str) else child.last() for child in fuse]
            required = self.peft_config[fuse.name].required_adapters()
            if not required:
                raise ConfigError(
                    f"{fuse!r} runs {fuse.name!r} as its fusion, and {fuse.name!r} is a {self._method(fuse.name).name} "
                    "adapter, which fuses nothing; name a fusion adapter (Fuse(..., name=...)), or leave name out"
                )
            if sorted(required) != sorted(fused):
                raise ConfigError(
                    f"{fuse!r} runs the fusion adapter {fuse.name!r}, which fuses {required}, not {fused}; name "
                    "the fusion of these adapters, or fuse the adapters that one was made for"
                )
            names.append(fuse.name)
        return list(dict.fromkeys(names))

    def _check_composition(
        self, block: CompositionBlock, names: list[str], layers: list[AdapterLayer]
    ) -> None:
        """Whether the model can run ``block`` as it is: nothing merged, one task head at most among the
        adapters it runs (``names``, its fusions included), and every layer able to compute it."""
        merged = sorted({name for layer in layers for name in layer.merged_adapters})
        if merged:
            raise ConfigError(
                f"a composition cannot run while adapters are merged ({', '.join(merged)}); call unmerge_adapter() first"
            )
        with_heads = [name for name in names if self.peft_config[name].modules_to_save]
        if len(with_heads) > 1:
            raise ConfigError(
                f"adapters {with_heads} each have modules_to_save (a trained task head); a composition may hold "
                "at most one adapter with a head (counting the fusions it runs), whose head then serves every row"
            )
        for layer in layers:
            layer.check_composition(block)

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_known([adapter_name])
        self._remove(adapter_name)
        remaining = [name for name in self.active_adapters if name != adapter_name]
        if adapter_name in self.active_adapters:
            self.active_composition = None  # a block that named it no longer can run; the rest stay active
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self.active_adapters = remaining
        for _, layer in self.adapter_layers():
            layer.set_active(remaining)
            layer.active_composition = self.active_composition
        self._note_answering()
        self._update_trainable()

    def _remove(self, adapter_name: str) -> None:
        config = self.peft_config[adapter_name]
        for _, layer in self.adapter_layers():
            if layer.holds(adapter_name):
                layer.delete_adapter(adapter_name)
        plugins.remove_adapter(self, config, adapter_name)
        if adapter_name in self.prompt_modules:
            del self.prompt_modules[adapter_name]
        del self.peft_config[adapter_name]
        self.__dict__["_adapter_layout"] = object()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block, the model computes exactly as the base model."""
        layers = [layer for _, layer in self.adapter_layers()]
        previous = [layer.disabled for layer in layers]
        was_disabled = self._adapters_disabled
        for layer in layers:
            layer.disabled = True
        self._adapters_disabled = True
        try:
            yield
        finally:
            for layer, state in zip(layers, previous):
                layer.disabled = state
            self._adapters_disabled = was_disabled

    # --- freezing ---------------------------------------------------------------------------------
    def _update_trainable(self) -> None:
        """The active adapters train, except those a ``Fuse`` fuses: there only the fusion trains, as in
        AdapterHub's ``train_adapter_fusion``."""
        from peftkit.composition import fuse_blocks

        for param in self.parameters():
            param.requires_grad_(False)
        fused = {name for fuse in fuse_blocks(self.active_composition) for name in fuse.flatten()}
        layers = [layer for _, layer in self.adapter_layers()]  # walked once, not once per adapter
        for name in self.active_adapters:
            if name in fused:
                continue
            config = self.peft_config[name]
            if config.inference_mode:
                continue
            for layer in layers:
                for _, param in layer.adapter_parameters(name):
                    param.requires_grad_(True)
            if name in self.prompt_modules:
                self.prompt_modules[name].requires_grad_(True)
            for _, param in plugins.trainable_parameters(self, config, name):
                param.requires_grad_(True)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def update_and_allocate(self, global_step: int) -> None:
        """Tell every adapter's method that optimizer step ``global_step`` was taken (PEFT's AdaLoRA name).

        Call it after ``optimizer.step()`` and before ``optimizer.zero_grad()``; methods that need no
        training-loop work ignore it. With a transformers ``Trainer`` a method's callback calls it.
        """
        for name, config in list(self.peft_config.items()):
            plugins.on_optimizer_step(self, config, name, global_step)

    # --- running ----------------------------------------------------------------------------------
    def _named_inputs(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        if not args:
            return dict(kwargs)
        return {**dict(zip(_positional_names(self.base_model.model.forward), args)), **kwargs}

    def _note_answering(self) -> None:
        """Note, per hook that rewrites a call, the active adapters whose method may answer it: only they are
        asked. Noted when the active adapters change, so that a forward reads no adapter name, and a compiled
        one does not recompile on ``set_adapter`` between adapters of methods that rewrite nothing (LoRA)."""
        answering = {
            rewrite: [
                name for name in self.active_adapters if plugins.may_answer(rewrite, self.peft_config[name])
            ]
            for rewrite in plugins.REWRITING_HOOKS
        }
        self.__dict__["_answering"] = (plugins.generation(), answering)

    def _adapters_answering(self, rewrite: Any) -> list[str]:
        noted = self.__dict__.get("_answering")
        if noted is None or noted[0] != plugins.generation():  # plugins (un)registered since
            self._note_answering()
        return self.__dict__["_answering"][1][rewrite.__name__]

    def _rewrite(self, inputs: dict[str, Any], rewrite: Any) -> dict[str, Any]:
        if self._adapters_disabled:
            return inputs
        for name in self._adapters_answering(rewrite):
            changed = rewrite(self, self.peft_config[name], name, inputs)
            if changed is not None:
                inputs = changed
        return inputs

    @forward_with_base_signature
    def forward(
        self, *args: Any, adapter_names: list[str] | None = None, task_ids: Any = None, **kwargs: Any
    ) -> Any:
        """Run the model with the active adapters; or, with ``adapter_names`` (one per row of the batch,
        ``"__base__"`` for none), each row with its own adapter, as PEFT's mixed batches do. ``task_ids``
        (one per row, a child's index or name) is for a ``MultiTask`` composition."""
        if adapter_names is not None:
            self._check_no_composition("adapter_names=")
            return self._forward_mixed(adapter_names, args, kwargs)
        if self._composes_rows():
            return self._forward_rows(self._named_inputs(args, kwargs), task_ids)
        self._check_no_task_ids(task_ids)
        return self._forward_active(self._named_inputs(args, kwargs))

    def _forward_active(self, inputs: dict[str, Any]) -> Any:
        inputs = self._rewrite(inputs, plugins.transform_inputs)
        outputs = self.base_model(**inputs)
        if self._adapters_disabled:
            return outputs
        for name in self._adapters_answering(plugins.transform_outputs):
            changed = plugins.transform_outputs(self, self.peft_config[name], name, inputs, outputs)
            if changed is not None:
                outputs = changed
        return outputs

    def generate(
        self, *args: Any, adapter_names: list[str] | None = None, task_ids: Any = None, **kwargs: Any
    ) -> Any:
        if adapter_names is not None:
            self._check_no_composition("adapter_names=")
            with self._mixed_batch(adapter_names):
                return self.base_model.model.generate(*args, **kwargs)
        inputs = self._named_inputs(args, kwargs)
        if self._composes_rows():
            inputs, resolved = self._rows_for_call(inputs, task_ids)
            with self._composition_for_call(resolved):
                return self._generate_active(inputs)
        self._check_no_task_ids(task_ids)
        return self._generate_active(inputs)

    def _generate_active(self, inputs: dict[str, Any]) -> Any:
        inputs = self._rewrite(inputs, plugins.prepare_generation)
        with self._rewriting_generation_steps():
            return self.base_model.model.generate(**inputs)

    # --- composition blocks over rows (BatchSplit, MultiTask, Parallel) ----------------------------------
    def _composes_rows(self) -> bool:
        return (
            self.active_composition is not None
            and not self._adapters_disabled
            and has_row_blocks(self.active_composition)
        )

    def _check_no_composition(self, what: str) -> None:
        if self.active_composition is not None:
            raise ValueError(
                f"{what} cannot be used while a composition block is active ({self.active_composition!r}); "
                "use BatchSplit or MultiTask in the block, or set_adapter(name) first"
            )

    def _check_no_task_ids(self, task_ids: Any) -> None:
        if task_ids is not None:
            raise ValueError(
                "task_ids= is for a MultiTask composition, and none is active; "
                "call set_adapter(MultiTask(...)) first"
            )

    @_not_traced(
        "peftkit turns a composition's rows into index tensors outside the graph; to compile it, compile the "
        "base model in place instead: model.get_base_model().compile()"
    )
    def _forward_rows(self, inputs: dict[str, Any], task_ids: Any) -> Any:
        inputs, resolved = self._rows_for_call(inputs, task_ids)
        with self._composition_for_call(resolved):
            return self._forward_active(inputs)

    def _rows_for_call(self, inputs: dict[str, Any], task_ids: Any) -> tuple[dict[str, Any], Any]:
        """The inputs repeated once per ``Parallel`` channel, and the composition with its rows resolved."""
        rows = _batch_rows(inputs)
        copies = parallel_channels(self.active_composition)
        if copies > 1:
            inputs = {
                key: value.repeat(copies, *([1] * (value.dim() - 1)))
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows
                else value
                for key, value in inputs.items()
            }
        return inputs, resolve_rows(self.active_composition, rows * copies, task_ids)

    @contextlib.contextmanager
    def _composition_for_call(self, resolved: Any) -> Iterator[None]:
        layers, _ = self._cached_adapter_layers()
        for layer in layers:
            layer.active_composition = resolved
        try:
            yield
        finally:
            for layer in layers:
                layer.active_composition = self.active_composition

    @contextlib.contextmanager
    def _rewriting_generation_steps(self) -> Iterator[None]:
        """While ``generate`` runs, pass each step's model inputs through ``peftkit_prepare_generation_step``."""
        model = self.base_model.model
        original = getattr(model, "prepare_inputs_for_generation", None)
        if original is None:
            yield
            return
        had_own = "prepare_inputs_for_generation" in vars(model)

        @functools.wraps(original)
        def prepare_step(*args: Any, **kwargs: Any) -> Any:
            return self._rewrite(original(*args, **kwargs), plugins.prepare_generation_step)

        model.prepare_inputs_for_generation = prepare_step
        try:
            yield
        finally:
            if had_own:
                model.prepare_inputs_for_generation = original
            else:
                del model.prepare_inputs_for_generation

    def _mixed_batch(self, adapter_names: list[str]):
        from peftkit.mixed_batch import BASE, ROW_WISE_FAMILIES, rows_using

        if isinstance(adapter_names, str) or not adapter_names:
            raise ValueError(
                f"adapter_names must be a list with one adapter name per row, got {adapter_names!r}"
            )
        self._check_known([name for name in adapter_names if name != BASE])
        for name in dict.fromkeys(adapter_names):
            spec = self._method(name) if name != BASE else None
            if spec is not None and spec.family not in ROW_WISE_FAMILIES:
                raise ValueError(
                    f"adapter {name!r} is a {spec.name} adapter ({spec.family}), which cannot differ from row to "
                    f"row of a batch; adapter_names takes adapters of the {', '.join(ROW_WISE_FAMILIES)} families"
                )
        layers, layouts = self._cached_adapter_layers()
        heads = [layer for layer in layers if isinstance(layer, ModulesToSaveWrapper)]
        with_heads = [
            name for name in dict.fromkeys(adapter_names) if any(head.holds(name) for head in heads)
        ]
        if with_heads:
            raise ValueError(
                f"adapter {with_heads[0]!r} has modules_to_save, whose trained copies cannot differ from row to "
                "row of a batch here; run its rows as a batch of their own"
            )
        merged = sorted({name for layer in layers for name in layer.merged_adapters})
        if merged:
            raise ValueError(
                f"adapter_names cannot be used while adapters are merged ({', '.join(merged)}): every row would "
                "see them; call unmerge_adapter() first"
            )
        if self._adapters_disabled:
            raise ValueError(
                "adapter_names cannot be used inside disable_adapter(); name rows '__base__' instead"
            )
        return rows_using(layers, adapter_names, layouts)

    @_not_traced(
        "peftkit turns adapter_names into index tensors outside the graph; to compile mixed batches "
        "with fullgraph=True, compile the base model in place instead: "
        "model.get_base_model().compile(fullgraph=True)"
    )
    def _forward_mixed(self, adapter_names: list[str], args: tuple, kwargs: dict[str, Any]) -> Any:
        """A mixed batch. Under torch.compile this frame is not traced, nor what reads the names (the model
        it calls is): the names become per-row index tensors first, so the compiled model sees tensors, and
        a batch naming other adapters runs the same graph."""
        batch = self._open_mixed_batch(adapter_names)
        try:
            return self.base_model(*args, **kwargs)
        finally:
            self._close_mixed_batch(batch)

    @torch.compiler.disable
    def _open_mixed_batch(self, adapter_names: list[str]) -> contextlib.AbstractContextManager:
        batch = self._mixed_batch(adapter_names)
        batch.__enter__()
        return batch

    @staticmethod
    @torch.compiler.disable
    def _close_mixed_batch(batch: contextlib.AbstractContextManager) -> None:
        batch.__exit__(None, None, None)

    def _cached_adapter_layers(self) -> tuple[list[AdapterLayer], list[tuple[tuple[str, ...], Any]]]:
        """The adapter layers, and the distinct ``(adapters held, device)`` of them (see
        :func:`peftkit.mixed_batch.rows_using`), found again only after an adapter was added or deleted:
        walking a model with many adapters costs more than a decoding step's adapter math."""
        key = self.__dict__.get("_adapter_layout")  # a new object on every add and delete
        cached = self.__dict__.get("_mixed_batch_layers")
        if cached is None or cached[0] is not key:
            layers = [layer for _, layer in self.adapter_layers()]
            layouts = {}
            for layer in layers:
                reference = next(layer.parameters(), None)
                if reference is not None:
                    layouts[(tuple(layer.adapter_names), reference.device)] = None
            cached = (key, layers, list(layouts))
            self.__dict__["_mixed_batch_layers"] = cached
        return cached[1], cached[2]

    # --- merging ----------------------------------------------------------------------------------
    def _check_mergeable(self, names: list[str]) -> None:
        for name in names:
            spec = self._method(name)
            if not spec.mergeable:
                raise MergeNotSupportedError(
                    f"adapter {name!r} is a {spec.name} adapter, and {spec.name} cannot be merged into the base "
                    "weights; keep the PeftModel for inference, or use a mergeable method such as LoRA"
                )

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters (by default every active one) into the base weights.

        Where adapters of several methods wrap one base layer they merge innermost first, the order in
        which they apply: the first added is innermost. An outer adapter cannot merge over an inner one
        that stays active and unmerged, because the inner one would then act on the merged weight.
        """
        if adapter_names is None and self.active_composition is not None:
            raise MergeNotSupportedError(
                f"the active adapters are a composition ({self.active_composition!r}), which merging cannot "
                "fold into one weight; name the adapters to merge (merge_adapter([...])), or for an Average of "
                "LoRA adapters make one adapter with add_weighted_adapter(..., combination_type='cat')"
            )
        names = list(adapter_names) if adapter_names is not None else list(self.active_adapters)
        self._check_known(names)
        self._check_mergeable(names)
        self._warn_tied_weights(names)
        in_layers = [name for name in names if not plugins.merge_adapter(self, self.peft_config[name], name)]
        stacks = self._layer_stacks()
        for stack in stacks:
            self._check_merge_order(stack, in_layers)
        for stack in stacks:
            for layer in stack:
                layer.merge([name for name in in_layers if layer.holds(name)], safe_merge=safe_merge)

    def _layer_stacks(self) -> list[list[AdapterLayer]]:
        """Adapter layers grouped by the base layer they wrap, innermost first."""
        stacks: dict[int, list[tuple[str, AdapterLayer]]] = {}
        for path, layer in self.adapter_layers():
            stacks.setdefault(id(layer.get_base_layer()), []).append((path, layer))
        return [
            [layer for _, layer in sorted(stack, key=lambda item: -len(item[0]))] for stack in stacks.values()
        ]

    def _check_merge_order(self, stack: list[AdapterLayer], merging: list[str]) -> None:
        pending: list[str] = []  # active, unmerged adapters of inner layers that stay unmerged
        for layer in stack:
            held = [
                name
                for name in self.active_adapters
                if layer.holds(name) and name not in layer.merged_adapters
            ]
            outer = [name for name in merging if layer.holds(name)]
            if outer and pending:
                raise MergeNotSupportedError(
                    f"cannot merge adapter {outer[0]!r} while adapter {pending[0]!r}, which wraps the same layer "
                    "beneath it, stays active and unmerged: merge both (merge_adapter() merges every active "
                    f"adapter, innermost first), or activate without {pending[0]!r}"
                )
            pending += [name for name in held if name not in merging]

    def _warn_tied_weights(self, names: list[str]) -> None:
        """Merging into a weight that other modules share (tied embeddings) changes them too: say so."""
        owners: dict[int, list[str]] = {}
        for path, module in self.base_model.model.named_modules(remove_duplicate=False):
            if isinstance(module, AdapterLayer):
                continue  # it shows its base layer's weight, which is not a tie
            weight = getattr(module, "weight", None)
            if isinstance(weight, nn.Parameter):
                owners.setdefault(id(weight), []).append(path)
        layers = dict(self.adapter_layers())
        for path, layer in layers.items():
            weight = getattr(layer.get_base_layer(), "weight", None)
            if weight is None or not any(layer.holds(name) for name in names):
                continue
            others = [
                p
                for p in owners.get(id(weight), [])
                if p != path and not p.startswith(path + ".") and not self._tie_covered(layer, p, layers)
            ]
            if others:
                warnings.warn(
                    f"merging into {path!r} also changes {', '.join(repr(p) for p in others)}, whose weight is "
                    "tied to it, so merged outputs will differ from unmerged ones; untie the weights first, "
                    "or keep this adapter unmerged",
                    UserWarning,
                    stacklevel=3,
                )

    @staticmethod
    def _tie_covered(layer: AdapterLayer, path: str, layers: dict[str, AdapterLayer]) -> bool:
        """Whether the tied module at ``path`` sits in an adapter layer that ``layer``'s merge already
        accounts for (trainable tokens' tied output head reads the same rows)."""
        owner = next((p for p in layers if path.startswith(p + ".base_layer")), None)
        return owner is not None and layer.merge_covers(layers[owner])

    def unmerge_adapter(self) -> None:
        for name in reversed(list(self.peft_config)):
            if plugins.unmerge_adapter(self, self.peft_config[name], name):
                continue
        for _, layer in self.adapter_layers():
            layer.unmerge()

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        dequantize: bool = False,
        dtype: torch.dtype | None = None,
    ) -> nn.Module:
        """Fold the adapters in and give back the plain base model, with no peftkit module left in it.

        A quantized base layer (a backend plugin's, such as bitsandbytes') is requantized after merging,
        which adds rounding error. With ``dequantize=True`` every quantized layer is first replaced by a
        full-precision one (``nn.Linear``, in ``dtype``, by default the layer's compute dtype), and the
        adapters merge into it exactly.
        """
        if dequantize:
            from peftkit.kbit import dequantize_base_layers

            dequantize_base_layers(self.base_model.model, dtype)
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        return self._unload(progressbar)

    def unload(self) -> nn.Module:
        """Give back the base model without merging: the adapters are dropped."""
        for _, layer in self.adapter_layers():
            layer.unmerge()
        return self._unload(False)

    def _unload(self, progressbar: bool) -> nn.Module:
        model = self.base_model.model
        layers = self.adapter_layers()
        if progressbar:
            from tqdm.auto import tqdm

            layers = tqdm(layers, desc="Unloading")
        # innermost first, so each path still resolves when its outer wrapper is replaced
        for path, layer in sorted(layers, key=lambda item: -item[0].count(".")):
            replacement = layer.unloaded()
            while isinstance(replacement, AdapterLayer) and not isinstance(replacement, ModulesToSaveWrapper):
                replacement = replacement.unloaded()
            model.set_submodule(path, replacement)
        return model

    # --- saving and loading -----------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | Path,
        selected_adapters: list[str] | None = None,
        format: str = PEFT_FORMAT,
        **_: Any,
    ) -> None:
        """Write each adapter in PEFT's format: "default" at the top, any other under a sub-folder of its name.

        ``format`` names another library's layout that the adapters' method writes (peftkit-bottleneck:
        ``"adapterhub"``, what AdapterHub's ``load_adapter`` reads), with the same folders.
        """
        names = list(selected_adapters) if selected_adapters is not None else list(self.peft_config)
        self._check_known(names)
        if format != PEFT_FORMAT:
            self._save_foreign(save_directory, names, format)
            return
        from peftkit import __version__

        with serialization.atomic_folder(save_directory) as staging:
            for name in names:
                folder = staging if name == "default" else staging / name
                folder.mkdir(parents=True, exist_ok=True)
                config = self.peft_config[name]
                spec = plugins.method_for_config(config)
                metadata = {"peftkit.version": __version__, "peftkit.method": spec.name}
                if spec.distribution:
                    metadata["peftkit.plugin"] = spec.distribution
                if spec.version:
                    metadata["peftkit.plugin_version"] = spec.version
                serialization.write_tensors(folder, serialization.adapter_state_dict(self, name), metadata)
                config.save_pretrained(folder)

    def _save_foreign(self, save_directory: str | Path, names: list[str], format: str) -> None:
        if not isinstance(format, str):
            raise ConfigError(
                f"save_pretrained's format must be a format's name, such as 'peft', got {format!r}"
            )
        with serialization.atomic_folder(save_directory) as staging:
            for name in names:
                folder = staging if name == "default" else staging / name
                folder.mkdir(parents=True, exist_ok=True)
                config = self.peft_config[name]
                if not plugins.save_foreign_adapter(self, config, name, format, folder):
                    raise ConfigError(
                        f"adapter {name!r} is a {self._method(name).name} adapter, and no installed plugin writes "
                        f"{self._method(name).name} adapters in format {format!r}; format='peft' (the default) "
                        "writes every method"
                    )

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | Path,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        subfolder: str | None = None,
        all_adapters: bool = False,
        **_: Any,
    ) -> PeftModel:
        """Load a saved adapter (ours or PEFT's) onto ``model``; it is active and, unless is_trainable, frozen.

        A folder in another library's format loads where an installed plugin reads that format
        (peftkit-bottleneck reads AdapterHub's ``save_adapter`` folders).

        ``all_adapters=True`` also loads every adapter saved in a sub-folder (where :meth:`save_pretrained`
        puts adapters not named "default"), each under its folder's name and inactive, as
        :meth:`load_adapter` leaves them: activate them with :meth:`set_adapter`.
        """
        folder = Path(model_id, subfolder) if subfolder else Path(model_id)
        foreign = read_foreign_adapter(folder, model) if config is None else None
        if foreign is not None:  # another library's folder, read by the plugin that knows its format
            config, tensors = foreign.config, foreign.tensors
        else:
            config = config if config is not None else load_config(folder)
            tensors = serialization.read_tensors(folder)
        config.inference_mode = not is_trainable
        peft_model = cls(model, config, adapter_name)
        serialization.load_adapter_state_dict(peft_model, adapter_name, tensors)
        if all_adapters:
            subfolders = sorted(path for path in folder.iterdir() if (path / CONFIG_NAME).is_file())
            for sub in _needed_first(subfolders):
                peft_model.load_adapter(sub, sub.name, is_trainable=is_trainable)
        return peft_model

    def load_adapter(
        self,
        model_id: str | Path,
        adapter_name: str | None = None,
        is_trainable: bool = False,
        subfolder: str | None = None,
        hotswap: bool = False,
        **_: Any,
    ) -> str:
        """Load another saved adapter under ``adapter_name``; like :meth:`add_adapter`, it is not activated.
        Returns its name. ``adapter_name`` may be left out for a folder in a format that names the adapter
        (AdapterHub's: an AdapterFusion folder loads under its fusion's name, ``"a,b"``).

        With ``hotswap=True``, ``adapter_name`` is an adapter this model already has, and the saved one's
        weights replace its weights in place (see :func:`peftkit.hotswap_adapter`): no module is created,
        it stays active if it was, and it trains only if ``is_trainable``.
        """
        folder = Path(model_id, subfolder) if subfolder else Path(model_id)
        if hotswap:
            swap_adapter(self, folder, self._name_to_load(adapter_name, None))
            self.peft_config[adapter_name].inference_mode = not is_trainable
            self._update_trainable()
            return adapter_name
        foreign = read_foreign_adapter(folder, self.base_model.model)
        if foreign is not None:  # another library's folder, read by the plugin that knows its format
            config, tensors = foreign.config, foreign.tensors
        else:
            config, tensors = load_config(folder), serialization.read_tensors(folder)
        adapter_name = self._name_to_load(adapter_name, foreign)
        config.inference_mode = not is_trainable
        self.add_adapter_from_tensors(adapter_name, config, tensors)
        return adapter_name

    @staticmethod
    def _name_to_load(adapter_name: str | None, foreign: Any) -> str:
        if adapter_name is not None:
            return adapter_name
        if foreign is not None and foreign.name:
            return foreign.name
        raise AdapterNameError(
            "load_adapter needs adapter_name=: the name the loaded adapter takes on this model"
        )

    def add_adapter_from_tensors(
        self, adapter_name: str, config: PeftConfig, tensors: dict[str, Any]
    ) -> None:
        """Add an adapter from its config and its saved tensors (keyed as in ``adapter_model.safetensors``);
        like :meth:`load_adapter`, it is not activated. Tensors that do not fit leave no adapter behind."""
        self.add_adapter(adapter_name, config)
        try:
            serialization.load_adapter_state_dict(self, adapter_name, tensors)
        except BaseException:
            self._remove(adapter_name)
            raise
        self._update_trainable()


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    autocast_adapter_dtype: bool = True,
) -> PeftModel:
    """Wrap ``model`` with a new, trainable adapter of the config's method."""
    return PeftModel(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)


def _needed_first(subfolders: list[Path]) -> list[Path]:
    """Adapter sub-folders in an order that loads each adapter after those its config requires among them (a
    fusion after the adapters it fuses); otherwise in the order given."""
    from peftkit.foreign_format import is_peft_folder

    names = {sub.name for sub in subfolders}
    requires = {
        sub.name: set(load_config(sub).required_adapters()) & names if is_peft_folder(sub) else set()
        for sub in subfolders
    }
    ordered: list[Path] = []
    pending = list(subfolders)
    while pending:
        loaded = {sub.name for sub in ordered}
        ready = next((sub for sub in pending if requires[sub.name] <= loaded), pending[0])  # [0]: a cycle
        ordered.append(ready)
        pending.remove(ready)
    return ordered


def _batch_rows(inputs: dict[str, Any]) -> int:
    """The batch size of a call: the rows of input_ids or inputs_embeds, else of its first tensor."""
    for key in ("input_ids", "inputs_embeds", *inputs):
        value = inputs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("a composition over rows needs a batched tensor input (input_ids, inputs_embeds, ...)")


def _positional_names(forward: Any) -> tuple[str, ...]:
    """The names a forward's positional arguments bind to. ``inspect.signature`` takes tens of microseconds,
    so a bound method's are looked up once per function (its first parameter, ``self``, left out)."""
    function = getattr(forward, "__func__", None)
    if function is None:  # a plain function or a callable object (an accelerate hook's wrapper): not cached
        return _positional_parameters(inspect.signature(forward))
    return _function_positional_names(function)[1:]


@functools.lru_cache(maxsize=64)
def _function_positional_names(function: Any) -> tuple[str, ...]:
    return _positional_parameters(inspect.signature(function))


def _positional_parameters(signature: inspect.Signature) -> tuple[str, ...]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in signature.parameters.values() if p.kind in kinds)
