"""CorDA's data pass and what it writes into the model: LoRA's answer to ``peftkit_initialize_from_data``
for adapters made with ``LoraConfig(init_lora_weights="corda", corda_config=CordaConfig(...))``.

The batches run through the model with its adapters off; each targeted linear layer adds its inputs to
a :class:`~peftkit_lora.corda.Covariance`. From each layer's covariance and weight,
:func:`~peftkit_lora.corda.corda_components` picks the ``r`` components of ``W C'`` that the adapter
takes; A and B are set to them and the base weight to the residual ``W − s·B A``. Like PEFT, the
covariances can be kept in ``covariance_file`` and the chosen components in ``cache_file`` (both keyed
by the layers' module paths, as PEFT keys them); when a file exists it is read instead of the data.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator

import torch
from peftkit import plugins
from peftkit.injection import logical_path
from peftkit.layer_access import LINEAR
from torch import nn

from peftkit_lora.config import CordaConfig, LoraConfig
from peftkit_lora.corda import Covariance, corda_components, corda_factors
from peftkit_lora.eva_init import _to_device
from peftkit_lora.layer import LoraLayer

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def corda_from_data(
    peft_model, config: LoraConfig, adapter_name: str, batches, forward, show_progress, options
) -> bool:
    """Initialise the CorDA adapter ``adapter_name`` from ``batches``; returns True."""
    if options:
        raise TypeError(f"LoRA's CorDA initialisation takes no option(s) {sorted(options)}")
    corda: CordaConfig = config.corda_config
    layers = _targets(peft_model, adapter_name)
    if any(bool(layer.lora_B[adapter_name].weight.any()) for layer in layers.values()):
        raise ValueError(
            f"adapter {adapter_name!r} was already initialised (its B is not zero): CorDA rewrote the base "
            "weights to the residual, and a second pass would decompose that residual; make the model anew"
        )
    components = _read_cache(corda.cache_file, layers)
    if components is None:
        covariances = _read_covariances(corda.covariance_file, layers)
        if covariances is None:
            covariances = _covariances(peft_model, layers, batches, forward, corda, show_progress)
            _save(corda.covariance_file, covariances)
        components = _components(layers, covariances, adapter_name, corda)
        _save(corda.cache_file, _cache_entries(components))
    for path, layer in layers.items():
        _write_adapter(path, layer, adapter_name, *components[path])
    return True


def _targets(peft_model, adapter_name: str) -> dict[str, LoraLayer]:
    """The adapter's linear LoRA layers by module path; others are refused, as CorDA cannot start them."""
    layers, refused = {}, []
    for path, layer in peft_model.adapter_layers():
        if isinstance(layer, LoraLayer) and layer.holds(adapter_name):
            if layer.features.kind != LINEAR:
                refused.append(f"{logical_path(path)} ({layer.features.kind})")
                continue
            weight = getattr(layer.get_base_layer(), "weight", None)
            if type(weight) is not nn.Parameter or weight.dtype not in FLOAT_DTYPES:
                held = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
                raise ValueError(
                    f"CorDA needs float32, float16 or bfloat16 base weights; {logical_path(path)!r} holds "
                    f"{held}: initialise the full-precision model, save it, and quantize the saved residual"
                )
            layers[logical_path(path)] = layer
    if refused:
        raise ValueError(
            f"CorDA initialises only linear layers, but adapter {adapter_name!r} targets {refused}: "
            "leave them out of target_modules"
        )
    return layers


@contextlib.contextmanager
def _hooks(layers: dict[str, LoraLayer], call: Callable[[str, object], None]) -> Iterator[None]:
    handles = [
        layer.register_forward_hook(lambda _m, args, _out, path=path: call(path, args))
        for path, layer in layers.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def _covariances(
    peft_model, layers, batches: Iterable, forward, corda: CordaConfig, show_progress: bool
) -> dict[str, torch.Tensor]:
    running = {path: Covariance(corda.use_float16_for_covariance) for path in layers}

    def read(path: str, args) -> None:
        x = args[0] if isinstance(args, (tuple, list)) and args else args
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"CorDA cannot read the input of layer {path!r}: it is a {type(x).__name__}")
        running[path].add(x)

    device = next((p.device for p in peft_model.parameters() if not p.is_meta), None)
    training = peft_model.training
    peft_model.eval()
    if show_progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="CorDA: reading layer inputs", unit="batch", leave=False)
    try:
        with peft_model.disable_adapter(), _hooks(layers, read):
            for batch in batches:
                forward(peft_model, _to_device(batch, device))
    finally:
        peft_model.train(training)
    unread = [path for path, cov in running.items() if cov.calls == 0]
    if unread:
        raise ValueError(
            f"the forward pass never ran these layers, so CorDA cannot read their inputs: {unread}"
        )
    return {path: cov.mean() for path, cov in running.items()}


@torch.no_grad()
def _components(layers, covariances, adapter_name: str, corda: CordaConfig):
    items = layers.items()
    if corda.verbose:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="CorDA: decomposing W·C", unit="layer")
    out = {}
    for path, layer in items:
        weight = plugins.read_weight(layer.get_base_layer())
        r = layer.r[adapter_name]
        if r > min(weight.shape):
            raise ValueError(
                f"CorDA: layer {path!r} is {tuple(weight.shape)}, so it has {min(weight.shape)} components, "
                f"fewer than its rank r={r}: use a smaller r (or rank_pattern) for it"
            )
        cov = covariances[path].to(weight.device)
        out[path] = corda_components(weight.float(), cov, r, corda.corda_method)
    return out


@torch.no_grad()
def _write_adapter(path: str, layer: LoraLayer, adapter_name: str, u, s, v) -> None:
    base = layer.get_base_layer()
    weight = plugins.read_weight(base)
    r = layer.r[adapter_name]
    if s.shape[0] != r or u.shape[0] != weight.shape[0] or v.shape[0] != weight.shape[1]:
        raise ValueError(
            f"CorDA's cache_file holds components of another shape for {path!r} (U {tuple(u.shape)}, "
            f"V {tuple(v.shape)}) than its weight {tuple(weight.shape)} at rank {r} needs: delete the file "
            "or build it with this model and rank"
        )
    scaling = layer.scaling[adapter_name]
    a, b = corda_factors(
        u.float().to(weight.device), s.float().to(weight.device), v.float().to(weight.device), scaling
    )
    layer.lora_A[adapter_name].weight.copy_(a)
    layer.lora_B[adapter_name].weight.copy_(b)
    plugins.write_weight(base, (weight.float() - scaling * (b @ a)).to(weight.dtype))


# --- PEFT's files ------------------------------------------------------------------------------------------
def _cache_entries(components) -> dict[str, torch.Tensor]:
    """PEFT's cache keys: ``<module path>.eigens.{U_WC, S_WC, V_WC}``."""
    out = {}
    for path, (u, s, v) in components.items():
        out.update({f"{path}.eigens.U_WC": u, f"{path}.eigens.S_WC": s, f"{path}.eigens.V_WC": v})
    return out


def _exists(file: str | None) -> bool:
    return file is not None and os.path.exists(file) and os.path.getsize(file) > 0


def _read_cache(file: str | None, layers) -> dict | None:
    if not _exists(file):
        return None
    cache = torch.load(file, map_location="cpu", weights_only=True)
    missing = [path for path in layers if f"{path}.eigens.S_WC" not in cache]
    if missing:
        raise ValueError(
            f"CorDA's cache_file {file!r} has no components for {missing}: delete it to rebuild it"
        )
    return {path: tuple(cache[f"{path}.eigens.{key}"] for key in ("U_WC", "S_WC", "V_WC")) for path in layers}


def _read_covariances(file: str | None, layers) -> dict | None:
    if not _exists(file):
        return None
    covariances = torch.load(file, map_location="cpu", weights_only=True)
    missing = [path for path in layers if path not in covariances]
    if missing:
        raise ValueError(
            f"CorDA's covariance_file {file!r} has no covariance for {missing}: delete it to rebuild it"
        )
    return {path: covariances[path] for path in layers}


def _save(file: str | None, tensors: dict[str, torch.Tensor]) -> None:
    if file is None:
        return
    os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
    torch.save({key: value.detach().cpu().contiguous() for key, value in tensors.items()}, file)
