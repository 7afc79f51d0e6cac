"""What LoftQ buys on a 4-bit base: the first-step loss gap to the bf16 model, with LoftQ and without it.

A Llama-shaped model built from its config is first trained for a few hundred steps on a synthetic
language (each sequence counts on from a random start by a random stride, modulo the vocabulary), so
that its weights carry structure and its loss is low, as a pretrained model's are; random weights
would make every loss log(vocabulary) and the gaps noise. It is then quantized to NF4 the way users
load it (transformers' BitsAndBytesConfig, float32 compute). Without LoftQ the adapter starts at B = 0, so the
model computes with the quantized weights alone; with LoftQ (``init_lora_weights="loftq"``) the base
holds Q and the adapter starts at the rank-r fit of W - Q. Printed: each model's loss on the same
batch, its gap to the bf16 model's, and the logits' distance to the float32 model's.

    python -m benchmarks.loftq_gap [--hidden 256] [--rank 16] [--iterations 1]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch
from peftkit import PeftModel, get_peft_model
from peftkit.merge_folder import without_bitsandbytes_kernel_notice
from peftkit.testing.models import tiny_llama
from peftkit_lora import LoftQConfig, LoraConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def counting(generator: torch.Generator, batch: int, length: int = 32, vocab: int = 128) -> torch.Tensor:
    start = torch.randint(1, vocab, (batch, 1), generator=generator)
    stride = torch.randint(1, 8, (batch, 1), generator=generator)
    return (start + stride * torch.arange(length)) % (vocab - 1) + 1


def pretrained(hidden: int, steps: int) -> torch.nn.Module:
    model = tiny_llama(hidden_size=hidden, intermediate_size=4 * hidden).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        tokens = counting(generator, 16)
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=1, help="LoftQ's loftq_iter")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    args = parser.parse_args()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    with without_bitsandbytes_kernel_notice():
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    tokens = counting(torch.Generator().manual_seed(1), 8)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )

    def loss_and_logits(model):
        model.train()  # bitsandbytes' exact 4-bit path on every CPU; the models have no dropout
        with torch.no_grad():
            out = model(input_ids=tokens, labels=tokens)
        return out.loss.item(), out.logits.float()

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        full = pretrained(args.hidden, args.pretrain_steps)
        full.save_pretrained(folder / "full")
        loss32, logits32 = loss_and_logits(full)
        loss16, _ = loss_and_logits(
            AutoModelForCausalLM.from_pretrained(folder / "full", dtype=torch.bfloat16)
        )

        plain = get_peft_model(
            AutoModelForCausalLM.from_pretrained(folder / "full", quantization_config=quantization),
            LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS),
        )
        config = LoraConfig(
            r=args.rank,
            lora_alpha=2 * args.rank,
            target_modules=TARGETS,
            init_lora_weights="loftq",
            loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=args.iterations),
        )
        fitted = get_peft_model(AutoModelForCausalLM.from_pretrained(folder / "full"), config)
        fitted.save_pretrained(folder / "adapter")
        fitted.unload().save_pretrained(folder / "base-q")
        loftq = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(folder / "base-q", quantization_config=quantization),
            folder / "adapter",
        )

        print(
            f"Llama, hidden {args.hidden}, 2 layers, pretrained {args.pretrain_steps} steps; NF4 base; "
            f"LoRA r={args.rank} on the 7 projections"
        )
        print(f"loss, float32: {loss32:.5f}   bf16: {loss16:.5f}")
        rows = [("NF4, LoRA at B = 0", plain), (f"NF4, LoftQ ({args.iterations} iteration(s))", loftq)]
        gaps = []
        for name, model in rows:
            loss, logits = loss_and_logits(model)
            distance = ((logits - logits32).norm() / logits32.norm()).item()
            gaps.append(abs(loss - loss16))
            print(
                f"{name:32s} loss {loss:.5f}  gap to bf16 {abs(loss - loss16):.2e}  logits off float32's by {distance:.4f}"
            )
        print(f"LoftQ's gap / plain QLoRA's gap: {gaps[1] / gaps[0]:.2f}")


if __name__ == "__main__":
    main()
