"""QLoRA: LoRA on 4-bit and 8-bit bitsandbytes bases, against PEFT on the same base in the same run.

The model is the issue's quantized reference: Llama-shaped, 2 layers, hidden size 512, intermediate size
1024, vocabulary 4000, saved with random weights and loaded back the way users load a quantized model
(transformers' ``BitsAndBytesConfig``): nf4 with double quantization computing in float32, or int8
(``load_in_8bit``, transformers' defaults). LoRA has r=16 on the seven projections; the batch is 2 × 128.

- **Step time**: forward and backward (no optimizer step, as in the training-step section), at LoRA
  dropout 0 and 0.1, and with gradient checkpointing as ``prepare_model_for_kbit_training`` turns it on
  (each library prepares its own copy with its own function; non-reentrant checkpointing for both). At
  dropout 0 without checkpointing, the *floor* runs too: the base alone, gradients to its input
  embeddings, the work no adapter can save.
- **Bytes kept for backward** at dropout 0.1, without checkpointing.
- **Peak memory of a 20-step run** (AdamW, dropout 0.1, gradient checkpointing): each library in a
  process of its own (``python -m benchmarks.quantized --peak LIBRARY``). On the CPU, the peak resident
  set size while training, the counter reset after loading (``/proc/self/clear_refs``); on CUDA,
  ``max_memory_allocated`` reset after loading.
- **Base layers' bytes** per parameter at fp32, bf16, int8, nf4 and nf4 with double quantization: the
  blocks' linear layers (the ones bitsandbytes quantizes), counted from their state dicts, which hold
  every piece of quantization state.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import peft
import peftkit
import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from benchmarks.common import LORA_TARGETS, interleaved, reference_batch, saved_tensor_bytes, synchronize
from benchmarks.training_step import adapter_step, floor_step, with_backward

ROOT = Path(__file__).resolve().parents[1]
NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
QUANTIZATION = {  # the bases trained on: the first two; the last for the bytes rows only
    "nf4": dict(NF4, bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
    "nf4 without double quantization": NF4,
}
TRAINED = ("nf4", "int8")
LIBRARIES = {"peftkit": peftkit, "PEFT": peft}
PEAK_STEPS = 20


def quantized_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=4000,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=512,
    )


def save_base(folder: Path) -> Path:
    torch.manual_seed(0)
    LlamaForCausalLM(quantized_config()).save_pretrained(folder)
    return folder


def load_quantized(folder: Path, kind: str, device: str) -> nn.Module:
    hf_logging.set_verbosity_error()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # int8 says on every call that it casts
    return AutoModelForCausalLM.from_pretrained(
        folder,
        quantization_config=BitsAndBytesConfig(**QUANTIZATION[kind]),
        device_map=device,
        dtype=torch.float32,
    )


def lora_model(library: str, base: nn.Module, dropout: float, checkpointing: bool) -> nn.Module:
    """``library``'s LoRA on a copy of ``base``, prepared by ``library``'s ``prepare_model_for_kbit_training``."""
    module = LIBRARIES[library]
    prepared = module.prepare_model_for_kbit_training(
        copy.deepcopy(base),
        use_gradient_checkpointing=checkpointing,
        # said for both: left unsaid, PEFT's leaves torch's deprecated reentrant default and peftkit's
        # transformers' non-reentrant one, and the rows would compare two kinds of checkpointing
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    config = module.LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, lora_dropout=dropout)
    return module.get_peft_model(prepared, config).train()


def step_rows(folder: Path, device: str, rounds: int) -> list[dict]:
    ids = reference_batch(device)
    rows = []
    for kind in TRAINED:
        base = load_quantized(folder, kind, device)
        for checkpointing in (False, True):
            for dropout in (0.0, 0.1):
                models = {name: lora_model(name, base, dropout, checkpointing) for name in LIBRARIES}
                steps = {
                    name: with_backward(adapter_step(model, ids), model) for name, model in models.items()
                }
                with_floor = not checkpointing and dropout == 0
                if with_floor:  # the base alone, gradients to its input: what no adapter can save
                    steps["floor"] = floor_contender(base, ids)
                timing = interleaved(steps, device, rounds)
                setting = f"dropout {dropout:g}" + (", gradient checkpointing" if checkpointing else "")
                rows.append(
                    {
                        "what": f"QLoRA training step, {kind} base, {setting}",
                        "figure": timing.ratio("peftkit", "PEFT"),
                        "against": "PEFT",
                        "goal": _step_goal(kind, dropout, checkpointing),
                        "detail": f"peftkit {timing.median('peftkit') * 1e3:.1f} ms, "
                        f"PEFT {timing.median('PEFT') * 1e3:.1f} ms"
                        + (f", floor {timing.median('floor') * 1e3:.1f} ms" if with_floor else ""),
                    }
                )
                del models, steps
    return rows


def floor_contender(base: nn.Module, ids: torch.Tensor):
    model = copy.deepcopy(base).train()
    forward = floor_step(model, ids)
    return lambda: forward().backward()


def _step_goal(kind: str, dropout: float, checkpointing: bool) -> float | None:
    if checkpointing:
        return None
    if kind == "nf4":
        return 0.95
    return 1.0 if dropout > 0 else None


def saved_bytes_row(folder: Path, device: str) -> dict:
    ids = reference_batch(device)
    base = load_quantized(folder, "nf4", device)
    saved = {}
    for name in LIBRARIES:
        model = lora_model(name, base, 0.1, checkpointing=False)
        saved[name] = saved_tensor_bytes(adapter_step(model, ids), model)
    return {
        "what": "bytes autograd keeps for backward, QLoRA (nf4), dropout 0.1",
        "figure": saved["peftkit"][0] / saved["PEFT"][0],
        "against": "PEFT",
        "goal": 0.8,
        "detail": "; ".join(
            f"{name} {total / 2**20:.1f} MiB ({activations / 2**20:.1f} MiB besides weights)"
            for name, (total, activations) in saved.items()
        ),
    }


def peak_row(folder: Path, device: str) -> dict:
    peaks = {name: _peak_in_subprocess(folder, device, name) for name in LIBRARIES}
    unit = "allocated" if device.startswith("cuda") else "resident"
    return {
        "what": f"peak memory of a {PEAK_STEPS}-step QLoRA run (nf4, dropout 0.1, gradient checkpointing)",
        "figure": peaks["peftkit"]["peak"] / peaks["PEFT"]["peak"],
        "against": "PEFT",
        "goal": 1.0,
        "detail": "; ".join(
            f"{name} {peak['peak'] / 2**20:.1f} MiB {unit} at peak, {peak['start'] / 2**20:.1f} MiB before training"
            for name, peak in peaks.items()
        ),
    }


def _peak_in_subprocess(folder: Path, device: str, library: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.quantized", "--peak", library, "--folder", str(folder)]
    command += ["--device", device, "--threads", str(torch.get_num_threads())]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the {library} peak-memory run failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_peak(folder: Path, device: str, library: str) -> dict:
    """Train ``PEAK_STEPS`` steps in this process; the peak memory while training and the memory before."""
    model = lora_model(library, load_quantized(folder, "nf4", device), 0.1, checkpointing=True)
    optimizer = torch.optim.AdamW([param for param in model.parameters() if param.requires_grad], lr=1e-4)
    ids = reference_batch(device)
    synchronize(device)
    start = _reset_peak(device)
    for _ in range(PEAK_STEPS):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    synchronize(device)
    return {"peak": _peak(device), "start": start}


def _reset_peak(device: str) -> int:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak resident set size starts again from now
    return _status_bytes("VmRSS")


def _peak(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else _status_bytes("VmHWM")


def _status_bytes(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024


def layer_bytes_rows(folder: Path, device: str) -> list[dict]:
    """Bytes per parameter of the blocks' linear layers, at each precision, against bf16."""
    dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    sizes = {"fp32": _layer_bytes(dense), "bf16": _layer_bytes(dense.to(torch.bfloat16))}
    sizes["int8"] = _layer_bytes(load_quantized(folder, "int8", device))
    sizes["nf4"] = _layer_bytes(load_quantized(folder, "nf4 without double quantization", device))
    sizes["nf4, double quantization"] = _layer_bytes(load_quantized(folder, "nf4", device))
    parameters = sum(layer.weight.numel() for layer in _block_linears(dense))
    return [
        {
            "what": f"bytes per parameter of the base layers, {name}",
            "figure": size / sizes["bf16"],
            "against": "bf16",
            "goal": None,
            "detail": f"{size / parameters:.3f} bytes per parameter ({size / 2**20:.2f} MiB)",
        }
        for name, size in sizes.items()
    ]


def _block_linears(model: nn.Module) -> list[nn.Module]:
    return [layer for layer in model.model.layers.modules() if isinstance(layer, nn.Linear)]


def _layer_bytes(model: nn.Module) -> int:
    return sum(  # bitsandbytes' layers subclass nn.Linear
        tensor.numel() * tensor.element_size()
        for layer in _block_linears(model)
        for tensor in layer.state_dict().values()
        if isinstance(tensor, torch.Tensor)
    )


def run(device: str, rounds: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_base(Path(tmp))
        rows = step_rows(folder, device, rounds)
        rows.append(saved_bytes_row(folder, device))
        rows.append(peak_row(folder, device))
        rows += layer_bytes_rows(folder, device)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="one library's peak memory over a short QLoRA run (JSON)")
    parser.add_argument("--peak", choices=sorted(LIBRARIES), required=True)
    parser.add_argument("--folder", type=Path, required=True, help="the saved base model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(measure_peak(args.folder, args.device, args.peak)))


if __name__ == "__main__":
    main()
