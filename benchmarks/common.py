"""What every benchmark shares: the reference model, its batch, interleaved timing, and saved-tensor bytes."""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def reference_config(**changes) -> LlamaConfig:
    """The issue's reference model: Llama-shaped, vocab 4000, hidden 768, 4 layers, grouped-query attention
    (``changes``: other LlamaConfig fields, for a benchmark that needs them)."""
    return LlamaConfig(
        **changes,
        vocab_size=4000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=4,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )


def reference_model(
    device: str, dtype: torch.dtype = torch.float32, seed: int = 0, **changes
) -> LlamaForCausalLM:
    """The same random weights for every contender (same seed), in eval mode unless a benchmark trains."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(reference_config(**changes)).to(device=device, dtype=dtype)
    model.requires_grad_(False)
    return model


def reference_batch(device: str, batch: int = 2, length: int = 128, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, reference_config().vocab_size, (batch, length), generator=generator).to(device)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclasses.dataclass
class Timing:
    """Per-contender seconds of each repetition; contenders ran interleaved, one of each per round."""

    seconds: dict[str, list[float]]

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def ratio(self, name: str, baseline: str) -> float:
        return self.median(name) / self.median(baseline)


def interleaved(
    contenders: dict[str, Callable[[], object]],
    device: str,
    rounds: int,
    warmup: int = 2,
    setup: dict[str, Callable[[], object]] | None = None,
) -> Timing:
    """Run each contender once per round, in turn, so machine load falls on all of them alike.

    The order rotates every round, so no contender always runs right after the same other one.
    ``setup[name]``, where given, runs untimed before each call of that contender.
    """
    names = list(contenders)
    setup = setup or {}
    for _ in range(warmup):
        for name in names:
            setup.get(name, lambda: None)()
            contenders[name]()
    synchronize(device)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            setup.get(name, lambda: None)()
            gc.collect()
            synchronize(device)
            start = time.perf_counter()
            contenders[name]()
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return Timing(seconds)


def compiled_graphs() -> int:
    """How many graphs dynamo has compiled in this process so far (the counter survives a dynamo reset):
    the difference across a call counts the graphs, first ones or recompiles, that the call compiled."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def failure(exc: Exception) -> str:
    """An exception in one line, for a row that reports it instead of stopping the suite."""
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"


def saved_tensor_bytes(step: Callable[[], torch.Tensor], model: torch.nn.Module) -> tuple[int, int]:
    """Bytes of the distinct storages autograd keeps for backward while ``step`` builds its graph: all
    of them (the measure the issue's figures use), and those that are not the model's own parameters
    (frozen weights that a linear layer keeps to pass gradients to its input, and exist anyway).

    Tensors that share a storage (views, or one input saved by several nodes) count once; the graph is
    freed again by a backward through the returned loss.
    """
    parameters = {param.untyped_storage().data_ptr() for param in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = step()
    loss.backward()
    activations = sum(size for pointer, size in storages.items() if pointer not in parameters)
    return sum(storages.values()), activations
