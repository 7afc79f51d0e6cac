"""How far a plain tiny model's training step (no adapter, every parameter trainable) under autocast is
from float32's, on the CPU and, where present, CUDA: the worst relative difference of the loss and of
the whole gradient over four seeds, for bf16 and fp16.

It is why the conformance kit's ``autocast_training_step`` compares in eval mode off the CPU: on an H200
the models with dropout (BERT, GPT-2) came out 26 % and 49 % off under either dtype, Llama (no dropout)
0.4 %, as on the CPU; CUDA draws dropout masks per dtype. Not part of ``benchmarks.run``; not timed.

    python -m benchmarks.autocast_gap
"""

import torch
from peftkit.testing.models import tiny_bert, tiny_gpt2, tiny_llama


def step(model, ids, labels, amp, device, scale):
    model.zero_grad(set_to_none=True)
    ctx = torch.autocast(device, dtype=amp) if amp is not None else torch.autocast(device, enabled=False)
    with ctx:
        loss = model(input_ids=ids, labels=labels).loss
    (loss * scale).backward()
    g = torch.cat([p.grad.double().flatten() / scale for p in model.parameters() if p.grad is not None])
    return loss.double().item(), g


def main():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if torch.cuda.is_available():
        m = torch.backends.cuda.matmul
        print(
            "tf32",
            m.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision(),
            "reduced-precision reductions bf16/fp16",
            m.allow_bf16_reduced_precision_reduction,
            m.allow_fp16_reduced_precision_reduction,
        )
    builders = {
        "bert32": lambda s: tiny_bert(seed=s, hidden_size=32),
        "gpt2-48": lambda s: tiny_gpt2(seed=s, n_embd=48),
        "llama16": lambda s: tiny_llama(seed=s, hidden_size=16),
    }
    for name, build in builders.items():
        for device in devices:
            for amp, scale in ((torch.bfloat16, 1.0), (torch.float16, 2.0**16)):
                worst_loss = worst_grad = 0.0
                for seed in range(4):
                    model = build(seed).to(device).train()
                    gen = torch.Generator().manual_seed(seed)
                    ids = torch.randint(2, 128, (2, 4), generator=gen).to(device)
                    labels = torch.zeros(2, dtype=torch.long, device=device) if "bert" in name else ids
                    torch.manual_seed(seed)
                    l32, g32 = step(model, ids, labels, None, device, 1.0)
                    torch.manual_seed(seed)
                    la, ga = step(model, ids, labels, amp, device, scale)
                    worst_loss = max(worst_loss, abs(la - l32) / abs(l32))
                    worst_grad = max(worst_grad, ((ga.cpu() - g32.cpu()).norm() / g32.cpu().norm()).item())
                print(
                    f"{name:8s} {device:4s} {str(amp):15s} worst relative loss diff {worst_loss:.4f}  grad diff {worst_grad:.4f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
