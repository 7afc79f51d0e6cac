"""Memory of a Llama-shaped model's base layers at fp32, bf16, int8 and 4-bit, and QLoRA's step time.

Memory: the bytes of the decoder blocks' linear layers (the layers bitsandbytes quantizes; embeddings,
norms and the head stay as they are), counted from each layer's state dict, which holds the weights and
every piece of quantization state (4-bit absmax, double-quantized absmax and its codebook; int8 row
scales). Step time: one forward, backward and AdamW step of LoRA (r=16, all linear layers) on an nf4
base computing in bf16 (QLoRA) against LoRA on the bf16 base, interleaved step by step in one run so
both see the same machine load; the figure is the ratio of medians.

Run: ``python benchmarks/quantized_memory.py`` (CPU; ``--device cuda`` on a GPU). Not a test.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import bitsandbytes as bnb
import peftkit
import torch
from peftkit import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


def llama(hidden: int, layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
    )
    return LlamaForCausalLM(config)


def block_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(path, m) for path, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)]


def quantized_copy(model: nn.Module, kind: str, device: str) -> nn.Module:
    """The model with each block's nn.Linear replaced as transformers' BitsAndBytesConfig would."""
    model = copy.deepcopy(model)
    for path, dense in block_linears(model):
        if kind == "int8":
            layer = bnb.nn.Linear8bitLt(
                dense.in_features, dense.out_features, bias=False, has_fp16_weights=False
            )
        else:
            layer = bnb.nn.Linear4bit(
                dense.in_features,
                dense.out_features,
                bias=False,
                compute_dtype=torch.bfloat16,
                quant_type="nf4",
                compress_statistics=kind == "nf4-dq",
            )
        layer.load_state_dict(dense.state_dict())
        model.model.layers.set_submodule(path, layer.to(device))  # moving to a device quantizes
    return model


def layer_bytes(model: nn.Module) -> int:
    return sum(
        t.numel() * t.element_size()
        for _, layer in block_linears(model)  # bitsandbytes' layers subclass nn.Linear
        for t in layer.state_dict().values()
        if isinstance(t, torch.Tensor)
    )


def memory_table(base: nn.Module, device: str) -> list[tuple[str, int]]:
    n_params = sum(m.weight.numel() for _, m in block_linears(base))
    rows = [("fp32", layer_bytes(base)), ("bf16", layer_bytes(copy.deepcopy(base).to(torch.bfloat16)))]
    for kind in ("int8", "nf4", "nf4-dq"):
        rows.append((kind, layer_bytes(quantized_copy(base, kind, device))))
    print(f"base layers: {n_params / 1e6:.1f}M parameters in {len(block_linears(base))} linear layers")
    print("| base layers | MiB | bytes per parameter | vs bf16 |")
    print("| --- | ---: | ---: | ---: |")
    bf16 = rows[1][1]
    for name, size in rows:
        print(f"| {name} | {size / 2**20:.1f} | {size / n_params:.3f} | {size / bf16:.2f} |")
    return rows


def step_times(base: nn.Module, device: str, steps: int, batch: int, seq: int) -> None:
    config = dict(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    lora = get_peft_model(copy.deepcopy(base).to(device=device, dtype=torch.bfloat16), LoraConfig(**config))
    qbase = quantized_copy(base, "nf4", device).to(device=device, dtype=torch.bfloat16)
    qlora = get_peft_model(
        peftkit.prepare_model_for_kbit_training(qbase, use_gradient_checkpointing=False), LoraConfig(**config)
    )
    tokens = torch.randint(1, 32000, (batch, seq), device=device)
    models = {"LoRA on bf16": lora, "QLoRA on nf4": qlora}
    optimizers = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        for name, m in models.items()
    }
    times: dict[str, list[float]] = {name: [] for name in models}
    for step in range(steps + 1):  # the first round warms up
        for name, model in models.items():
            model.train()
            _sync(device)
            start = time.perf_counter()
            model(input_ids=tokens, labels=tokens).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad()
            _sync(device)
            if step:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"\nstep time, batch {batch} x {seq} tokens, {steps} interleaved steps each (median):")
    for name, median in medians.items():
        print(f"  {name}: {median * 1000:.0f} ms")
    print(f"  QLoRA / LoRA: {medians['QLoRA on nf4'] / medians['LoRA on bf16']:.2f}")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "")
    )
    base = llama(args.hidden, args.layers)
    memory_table(base, args.device)
    if not args.skip_timing:
        step_times(base, args.device, args.steps, args.batch, args.seq)


if __name__ == "__main__":
    main()
