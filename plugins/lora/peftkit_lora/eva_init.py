"""EVA's data pass and what it writes into the model: PEFT's ``get_eva_state_dict`` and
``initialize_lora_eva_weights``.

The data pass runs batches through the model with its adapters off, and hands each targeted linear
layer's input rows to the layer's :class:`~peftkit_lora.eva.IncrementalPCA`, until every layer's directions
have converged for the rank it is given (:func:`~peftkit_lora.eva.redistribute_ranks`, after each batch).
Layers that read one and the same input tensor (q, k and v) share one PCA. The result, layer path to A's
rows, is loaded as the adapter's A; a layer whose rank changed is made anew at that rank (zero B), a
layer given rank 0 loses the adapter, and the config records the ranks (``rank_pattern``), the scales
(``alpha_pattern``) and the layers kept (``target_modules``): afterwards it is a plain LoRA adapter.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from peftkit import plugins
from peftkit.injection import find_targets, logical_path
from peftkit.layer_access import LINEAR
from torch import nn

from peftkit_lora.config import LoraConfig
from peftkit_lora.eva import IncrementalPCA, eva_rows, redistribute_ranks
from peftkit_lora.layer import LoraLayer, pattern_value

PREFIX = "base_model.model."  # PEFT's names of a PeftModel's layers, as its EVA state dicts key them
# passes over the data before unconverged layers are taken as they stand (PEFT reads on without end: a tau
# of 1.0 may never be met in floating point)
MAX_PASSES = 100
RHO_CEILING = 1000  # above it, rho is capped at what the model's largest dimension allows, as in PEFT


# --- PEFT's default functions ---------------------------------------------------------------------------
def forward_fn_dict(model: nn.Module, inputs: Mapping[str, Any]) -> Any:
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input: Any, peft_config: LoraConfig) -> torch.Tensor:
    """The (batch, position) indices of the tokens whose inputs EVA reads: the attention mask's, less
    those labelled ``label_mask_value`` when ``use_label_mask``."""
    if not isinstance(model_input, Mapping):
        raise TypeError(
            "prepare_model_inputs_fn_language_modeling needs each batch to be a dict of model inputs, got "
            f"{type(model_input).__name__}: pass prepare_model_inputs_fn=None (and prepare_layer_inputs_fn=None) "
            "to read every row of each layer's input"
        )
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    eva = peft_config.eva_config
    if eva.use_label_mask and "labels" in model_input:
        mask = mask & (model_input["labels"] != eva.label_mask_value)
    return mask.nonzero()


def prepare_layer_inputs_fn_language_modeling(
    layer_input: Any, model_input: torch.Tensor, layer_name: str
) -> torch.Tensor:
    """The layer input's rows at the token indices :func:`prepare_model_inputs_fn_language_modeling` chose."""
    return _first_tensor(layer_input, layer_name)[model_input.T.unbind()]


def prepare_layer_inputs_fn_default(layer_input: Any, model_input: Any, layer_name: str) -> torch.Tensor:
    """Every row of the layer input: all dimensions but the last flattened."""
    x = _first_tensor(layer_input, layer_name)
    return x.reshape(-1, x.shape[-1])


def _first_tensor(layer_input: Any, layer_name: str) -> torch.Tensor:
    if isinstance(layer_input, (tuple, list)) and layer_input:
        layer_input = layer_input[0]
    if not isinstance(layer_input, torch.Tensor):
        raise TypeError(
            f"EVA cannot read the input of layer {layer_name!r}: it is a {type(layer_input).__name__}, not a "
            "tensor; pass a prepare_layer_inputs_fn (for this layer: a dict of layer name to function) that "
            "returns its input rows as a 2-D tensor"
        )
    return layer_input


# --- the public functions ----------------------------------------------------------------------------
@torch.no_grad()
def get_eva_state_dict(
    model: nn.Module,
    dataloader: Iterable,
    peft_config: LoraConfig | None = None,
    forward_fn: Callable | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable
    | dict[str, Callable]
    | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> dict[str, torch.Tensor]:
    """A's rows for each targeted linear layer, keyed by layer name (a PeftModel's as PEFT names them,
    ``base_model.model.<path>``; a plain model's by its module path, with ``peft_config`` saying which
    layers are targeted). Each value has as many rows as the layer's EVA rank, possibly 0."""
    from peftkit import PeftModel

    if isinstance(model, PeftModel):
        peft_config = peft_config or model.peft_config[adapter_name]
        targets = [
            (PREFIX + path, layer, logical_path(path))
            for path, layer in model.adapter_layers()
            if isinstance(layer, LoraLayer) and layer.holds(adapter_name) and layer.features.kind == LINEAR
        ]
        adapters_off = model.disable_adapter()
    elif peft_config is None:
        raise ValueError("get_eva_state_dict needs peft_config when the model is not a peftkit PeftModel")
    else:
        targets = [
            (path, module, path)
            for path in find_targets(model, peft_config)
            for module in [model.get_submodule(path)]
            if _is_linear(module)
        ]
        adapters_off = contextlib.nullcontext()
    _check_eva_config(peft_config)
    with adapters_off:
        return _DataPass(
            model,
            targets,
            peft_config,
            forward_fn or forward_fn_dict,
            prepare_model_inputs_fn,
            prepare_layer_inputs_fn,
            gather_distributed_inputs,
            show_progress_bar,
        ).run(dataloader)


@torch.no_grad()
def initialize_lora_eva_weights(
    model: nn.Module,
    dataloader: Iterable | None = None,
    eva_state_dict: dict[str, torch.Tensor] | None = None,
    forward_fn: Callable | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable
    | dict[str, Callable]
    | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> nn.Module:
    """PEFT's name: EVA-initialise the adapter ``adapter_name`` of a model made with
    ``LoraConfig(init_lora_weights="eva")``, from ``dataloader`` (through the core's
    :func:`peftkit.initialize_from_data`) or from an ``eva_state_dict`` computed before."""
    from peftkit import PeftModel, initialize_from_data

    if not isinstance(model, PeftModel):
        raise TypeError(
            f"initialize_lora_eva_weights needs a peftkit PeftModel (from get_peft_model), got {type(model).__name__}"
        )
    if eva_state_dict is not None:
        _check_eva_adapter(model, adapter_name)
        load_eva_state_dict(model, eva_state_dict, adapter_name)
        return model
    if dataloader is None:
        raise ValueError(
            "initialize_lora_eva_weights needs a dataloader, or an eva_state_dict computed before"
        )
    return initialize_from_data(
        model,
        dataloader,
        adapter_name=adapter_name,
        forward_fn=forward_fn,
        show_progress_bar=show_progress_bar,
        prepare_model_inputs_fn=prepare_model_inputs_fn,
        prepare_layer_inputs_fn=prepare_layer_inputs_fn,
        gather_distributed_inputs=gather_distributed_inputs,
    )


def eva_from_data(
    peft_model, config: LoraConfig, adapter_name: str, batches, forward, show_progress, options
) -> bool:
    """LoRA's answer to ``peftkit_initialize_from_data``: EVA, for adapters made with init_lora_weights="eva"."""
    _check_eva_adapter(peft_model, adapter_name)
    unknown = sorted(
        set(options) - {"prepare_model_inputs_fn", "prepare_layer_inputs_fn", "gather_distributed_inputs"}
    )
    if unknown:
        raise TypeError(f"LoRA's EVA initialisation takes no option(s) {unknown}")
    state = get_eva_state_dict(
        peft_model,
        batches,
        forward_fn=forward,
        adapter_name=adapter_name,
        show_progress_bar=show_progress,
        prepare_model_inputs_fn=options.get(
            "prepare_model_inputs_fn", prepare_model_inputs_fn_language_modeling
        ),
        prepare_layer_inputs_fn=options.get(
            "prepare_layer_inputs_fn", prepare_layer_inputs_fn_language_modeling
        ),
        gather_distributed_inputs=options.get("gather_distributed_inputs", True),
    )
    load_eva_state_dict(peft_model, state, adapter_name)
    return True


def _check_eva_adapter(peft_model, adapter_name: str) -> None:
    config = peft_model.peft_config.get(adapter_name)
    if config is None:
        from peftkit import AdapterNameError

        raise AdapterNameError(
            f"no adapter named {adapter_name!r}; this model has {sorted(peft_model.peft_config)}"
        )
    if not isinstance(config, LoraConfig) or config.init_lora_weights != "eva":
        init = getattr(config, "init_lora_weights", None)
        raise ValueError(
            f"EVA initialises only LoRA adapters made with init_lora_weights='eva'; adapter {adapter_name!r} "
            f"is {type(config).__name__}(init_lora_weights={init!r}): make it with "
            "LoraConfig(init_lora_weights='eva', eva_config=EvaConfig(...)), or for CorDA "
            "LoraConfig(init_lora_weights='corda', corda_config=CordaConfig(...))"
        )
    _check_eva_config(config)


def _check_eva_config(config: LoraConfig) -> None:
    if getattr(config, "eva_config", None) is None:
        raise ValueError("EVA needs LoraConfig.eva_config (an EvaConfig) with init_lora_weights='eva'")


def _is_linear(module: nn.Module) -> bool:
    features = plugins.layer_features(module)
    return features is not None and features.kind == LINEAR


# --- the data pass -----------------------------------------------------------------------------------------
class _Group:
    """Layers that read one input tensor, and the PCA of that input."""

    def __init__(self, names: list[str], k: int, prepare: Callable) -> None:
        self.names, self.pca, self.prepare = names, IncrementalPCA(k), prepare
        self.reading = True  # False once converged for the ranks its layers are given


class _DataPass:
    def __init__(
        self, model, targets, config, forward, prepare_model_inputs, prepare_layer_inputs, gather, progress
    ) -> None:
        if not targets:
            raise ValueError(
                "EVA found no linear layer to initialise: it reads the inputs of LoRA's linear layers "
                "(not embeddings or convolutions)"
            )
        self.model, self.config, self.forward = model, config, forward
        self.prepare_model_inputs, self.gather, self.progress = prepare_model_inputs, gather, progress
        self.modules = {name: module for name, module, _ in targets}
        rho = config.eva_config.rho
        if rho > RHO_CEILING:
            rho = min(rho, max((max(p.shape) for p in model.parameters() if p.dim()), default=1) // config.r)
        ranks = {name: int(pattern_value(config.rank_pattern, path, config.r)) for name, _, path in targets}
        self.budget = sum(ranks.values())
        self.caps = {name: round(rank * rho) for name, rank in ranks.items()}
        self.prepare_layer = self._layer_functions(prepare_layer_inputs)
        self.model_input: Any = None

    def _layer_functions(self, given) -> dict[str, Callable]:
        default = prepare_layer_inputs_fn_default if self.prepare_model_inputs is None else None
        if isinstance(given, Mapping):
            unknown = sorted(set(given) - set(self.modules))
            if unknown:
                raise ValueError(
                    f"prepare_layer_inputs_fn names layers EVA does not initialise: {unknown}; "
                    f"it initialises {sorted(self.modules)}"
                )
            fallback = default or prepare_layer_inputs_fn_language_modeling
            return {name: given.get(name, fallback) for name in self.modules}
        return {name: given or default or prepare_layer_inputs_fn_default for name in self.modules}

    def run(self, dataloader: Iterable) -> dict[str, torch.Tensor]:
        training = self.model.training
        self.model.eval()
        if (
            iter(dataloader) is dataloader
        ):  # a one-shot iterator: kept, as the batches are read more than once
            dataloader = list(dataloader)
        try:
            first = next(iter(dataloader), None)
            if first is None:
                raise ValueError("EVA's dataloader is empty: it needs batches of model inputs")
            self.device = next((p.device for p in self.model.parameters() if not p.is_meta), None)
            self.groups = self._group_by_input(_to_device(first, self.device))
            self.layer_group = {name: group for group in self.groups for name in group.names}
            self.ranks = dict(self.caps)
            self._read_until_converged(dataloader)
            return {
                name: eva_rows(self.layer_group[name].pca, self.ranks[name], self.config.eva_config.whiten)
                for name in self.modules
            }
        finally:
            self.model.train(training)

    def _group_by_input(self, batch: Any) -> list[_Group]:
        """Run one batch and group the layers that receive the very same input tensor (and prepare it alike)."""
        seen: list[tuple[weakref.ref, Callable, list[str]]] = []

        def note(name: str, layer_input: Any) -> None:
            x = _first_tensor(layer_input, name)
            for ref, prepare, names in seen:
                if ref() is x and prepare is self.prepare_layer[name]:
                    names.append(name)
                    return
            seen.append((weakref.ref(x), self.prepare_layer[name], [name]))

        with self._hooks(note):
            self.forward(self.model, batch)
        found = {name for _, _, names in seen for name in names}
        unread = [name for name in self.modules if name not in found]
        if unread:
            raise ValueError(
                f"the forward pass never ran these layers, so EVA cannot read their inputs: {unread}"
            )
        return [_Group(names, max(self.caps[n] for n in names), prepare) for _, prepare, names in seen]

    @contextlib.contextmanager
    def _hooks(self, call: Callable[[str, Any], None]) -> Iterator[None]:
        handles = [
            module.register_forward_hook(lambda _m, args, _out, name=name: call(name, args))
            for name, module in self.modules.items()
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _read_until_converged(self, dataloader: Iterable) -> None:
        tau = self.config.eva_config.tau
        leader = {group.names[0]: group for group in self.groups}

        def read(name: str, layer_input: Any) -> None:
            group = leader.get(name)
            if group is None or not group.reading:
                return
            rows = group.prepare(layer_input, self.model_input, name)
            rows = _gathered(rows) if self.gather else rows
            if rows.shape[0] >= group.pca.k:  # fewer rows than directions: skipped, as PEFT skips them
                group.pca.update(rows, tau)

        bar = _progress_bar(len(self.modules)) if self.progress else None
        passes = 0
        try:
            with self._hooks(read):
                while not self._converged(bar):
                    if passes == MAX_PASSES:
                        self._warn_unconverged(tau)
                        break
                    passes += 1
                    before = [group.pca.n for group in self.groups]
                    for batch in dataloader:
                        if self._converged(bar):
                            break
                        batch = _to_device(batch, self.device)
                        self.model_input = (
                            self.prepare_model_inputs(batch, self.config)
                            if self.prepare_model_inputs is not None
                            else batch
                        )
                        self.forward(self.model, batch)
                        if all(group.pca.components is not None for group in self.groups):
                            self._redistribute()
                        if bar is not None:
                            bar.update(1)
                    self._check_progress(before)
        finally:
            if bar is not None:
                bar.close()

    def _warn_unconverged(self, tau: float) -> None:
        names = [name for group in self.groups if group.reading for name in group.names]
        warnings.warn(
            f"EVA: after {MAX_PASSES} passes over the data, the inputs of {names} still had not converged to "
            f"cosine similarity tau={tau} between batches; their directions are taken as they stand (a lower "
            "tau, e.g. PEFT's 0.99, or more varied batches converge)",
            UserWarning,
            stacklevel=4,
        )

    def _redistribute(self) -> None:
        ratios = {
            name: self.layer_group[name].pca.explained_variance_ratio[: self.caps[name]]
            for name in self.modules
        }
        self.ranks = redistribute_ranks(ratios, self.budget)

    def _converged(self, bar) -> bool:
        done = 0
        for group in self.groups:
            need = max(self.ranks[name] for name in group.names)
            group.reading = not (group.pca.n > 0 and group.pca.converged_up_to(need))
            done += 0 if group.reading else len(group.names)
        if bar is not None:
            bar.set_description(f"EVA: {done}/{len(self.modules)} layers converged")
        return done == len(self.modules)

    def _check_progress(self, before: list[int]) -> None:
        """After a whole pass over the data, a layer still without enough rows can never converge."""
        for group, rows_before in zip(self.groups, before):
            if group.reading and group.pca.n == rows_before:
                raise ValueError(
                    f"layer {group.names[0]!r} never received {group.pca.k} input rows in one batch, as EVA "
                    f"needs for its {group.pca.k} directions (r · rho): use larger batches, or fewer rows masked out"
                )


def _gathered(rows: torch.Tensor) -> torch.Tensor:
    """Under torch.distributed, every rank's rows (PEFT's gather_distributed_inputs); else the rows."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return rows
    sizes = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([rows.shape[0]], device=rows.device))
    longest = int(max(sizes))
    padded = rows.new_zeros(longest, *rows.shape[1:])
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(size)] for part, size in zip(parts, sizes)])


def _to_device(batch: Any, device: torch.device | None) -> Any:
    """A batch's tensors on the model's device (a dict, list or tuple of them, or one)."""
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({key: _to_device(value, device) for key, value in batch.items()})
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(desc=f"EVA: 0/{total} layers converged", unit="batch", leave=False)


# --- writing the result into the model ---------------------------------------------------------------------
@torch.no_grad()
def load_eva_state_dict(peft_model, eva_state_dict: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Set each layer's A to its EVA rows (B zero) at the rank they give; record ranks, scales and kept
    layers in the config. Layers missing from the state dict keep the plain init, with a warning."""
    config: LoraConfig = peft_model.peft_config[adapter_name]
    rows_by_path = {name.removeprefix(PREFIX): rows for name, rows in eva_state_dict.items()}
    model = peft_model.base_model.model
    rank_pattern, alpha_pattern, kept, missing = {}, {}, [], []
    for path, layer in peft_model.adapter_layers():
        if not (isinstance(layer, LoraLayer) and layer.holds(adapter_name)):
            continue
        module_path = logical_path(path)
        r = layer.r[adapter_name]
        alpha = layer.lora_alpha[adapter_name]
        rows = rows_by_path.pop(module_path, None)
        if rows is None:
            missing.append(module_path)
            rank = r
        else:
            rank = rows.shape[0]
            if rank == 0:
                _drop_adapter(model, path, layer, adapter_name)
                continue
            if rank != r:
                if config.eva_config.adjust_scaling_factors:
                    alpha = alpha * rank / r
                _remake_at_rank(layer, adapter_name, config, module_path, rank, alpha)
            a = layer.lora_A[adapter_name].weight
            a.copy_(rows.to(a.device, a.dtype))
            layer.lora_B[adapter_name].weight.zero_()
        kept.append(module_path)
        if rank != config.r:
            rank_pattern[module_path] = rank
        if alpha != config.lora_alpha:
            alpha_pattern[module_path] = alpha
    if rows_by_path:
        raise ValueError(
            f"the EVA state dict names layers that hold no adapter {adapter_name!r}: {sorted(rows_by_path)}"
        )
    config.target_modules = kept
    config.rank_pattern, config.alpha_pattern = rank_pattern, alpha_pattern
    peft_model._cast_adapter(adapter_name)
    peft_model.set_adapter(peft_model.active_adapters)
    if missing:
        warnings.warn(
            f"EVA initialised no A in {missing} (EVA reads only linear layers' inputs); they keep "
            "init_lora_weights=True's",
            UserWarning,
            stacklevel=3,
        )


def _remake_at_rank(
    layer: LoraLayer, adapter_name: str, config: LoraConfig, path: str, rank: int, alpha
) -> None:
    training = layer.training
    at_rank = config.replace(r=rank, lora_alpha=alpha, rank_pattern={}, alpha_pattern={})
    layer.update_layer(adapter_name, at_rank, path)
    layer.train(training)


def _drop_adapter(model: nn.Module, path: str, layer: LoraLayer, adapter_name: str) -> None:
    """EVA gave the layer rank 0: the adapter leaves it, and a layer left with no adapter is unwrapped."""
    layer.delete_adapter(adapter_name)
    if not layer.adapter_names:
        model.set_submodule(path, layer.unloaded())
