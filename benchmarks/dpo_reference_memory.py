"""DPO's reference model: the memory a peftkit model saves by being its own reference.

TRL's ``DPOTrainer`` needs the log-probabilities of a frozen reference. For a model it does not know as a
PEFT model it loads a second copy of the base model; for a peftkit model, through
``peftkit.integrations.trl.DPOTrainer``, the reference is the same model with its adapters disabled. This
runs both on a Llama-shaped model (random weights, no download) and takes two DPO steps with LoRA (r=16,
q/v):

- ``peftkit``: ``DPOTrainer(model=base, peft_config=LoraConfig(...))``, ``ref_model=None``;
- ``copy``: the same, with ``ref_model=copy.deepcopy(base)``, the second copy TRL makes otherwise.

Reported per run, each in its own process: the bytes of parameters held (every distinct storage of an
``nn.Parameter`` alive after the steps, so the reference's whatever holds it), the process's peak resident
memory, and with ``--device cuda`` the peak of allocated GPU memory. The figure is the ratio copy/peftkit.

Run: ``python benchmarks/dpo_reference_memory.py`` (CPU; ``--device cuda`` on a GPU). Not a test.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import resource
import subprocess
import sys
import tempfile

import torch

HIDDEN, LAYERS, VOCAB_SIZE = 1024, 8, 32000
WORDS = "the sky sea grass sun ice is blue green yellow red cold hot wet dry".split()


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=HIDDEN * 8 // 3 // 64 * 64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HIDDEN // 64,
        num_key_value_heads=HIDDEN // 64,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def parameter_bytes() -> int:
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.nn.Parameter):
            storage = obj.untyped_storage()
            storages[(storage.device.type, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def run(variant: str, device: str) -> dict:
    import trl
    from datasets import Dataset
    from peftkit import LoraConfig
    from peftkit.integrations.trl import DPOTrainer

    data = Dataset.from_dict(
        {
            "prompt": ["the sky is", "the grass is", "the sun is", "ice is"] * 2,
            "chosen": [" blue", " green", " yellow", " cold"] * 2,
            "rejected": [" green", " red", " cold", " hot"] * 2,
        }
    )
    base = llama().to(device)
    ref_model = copy.deepcopy(base).eval() if variant == "copy" else None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as folder:
        args = trl.DPOConfig(
            output_dir=folder,
            max_steps=2,
            per_device_train_batch_size=4,
            learning_rate=1e-4,
            bf16=False,
            use_cpu=device == "cpu",
            report_to="none",
            disable_tqdm=True,
            save_strategy="no",
            logging_strategy="no",
            seed=0,
        )
        trainer = DPOTrainer(
            model=base,
            ref_model=ref_model,
            args=args,
            train_dataset=data,
            processing_class=tokenizer(),
            peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
        )
        trainer.train()
        held = parameter_bytes()
        adapter = sum(p.numel() * p.element_size() for p in trainer.model.parameters() if p.requires_grad)
    result = {
        "variant": variant,
        "reference": "none (adapters disabled)" if trainer.ref_model is None else "copy of the base model",
        "parameter_bytes": held,
        "adapter_bytes": adapter,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if device == "cuda":
        result["peak_cuda_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return result


def mib(count: int) -> str:
    return f"{count / 2**20:,.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--variant", choices=["peftkit", "copy"], help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.variant:  # a child process: one run, its figures as JSON
        print(json.dumps(run(options.variant, options.device)))
        return
    results = {}
    for variant in ("peftkit", "copy"):
        command = [sys.executable, __file__, "--variant", variant, "--device", options.device]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(output.strip().splitlines()[-1])
    base_params = sum(p.numel() for p in llama().parameters())
    print(
        f"Llama {HIDDEN}x{LAYERS}, vocab {VOCAB_SIZE}: {base_params / 1e6:.1f}M parameters, fp32; "
        f"LoRA r=16 on q/v; 2 DPO steps on {options.device}"
    )
    keys = ["parameter_bytes", "peak_rss_bytes"]
    if options.device == "cuda":
        keys.append("peak_cuda_allocated_bytes")
    for variant, result in results.items():
        figures = ", ".join(f"{key}: {mib(result[key])}" for key in keys)
        print(f"  {variant:8s} reference: {result['reference']}; {figures}")
    for key in keys:
        ratio = results["copy"][key] / results["peftkit"][key]
        saved = results["copy"][key] - results["peftkit"][key]
        print(f"  {key}: copy / peftkit = {ratio:.2f}x ({mib(saved)} saved)")


if __name__ == "__main__":
    main()
