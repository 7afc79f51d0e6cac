"""LoRA training on several processes with DistributedDataParallel, on the CPU (gloo) or on GPUs (nccl).

    torchrun --nproc_per_node 2 examples/train_ddp.py --output out/ddp
    accelerate launch --num_processes 2 --cpu examples/train_ddp.py --accelerate --output out/acc
    torchrun --nproc_per_node 2 examples/train_ddp.py --fsdp --output out/fsdp
    python examples/train_ddp.py --output out/single          # one process, the whole batch

Every step takes a global batch of ``--global-batch-size`` sequences; with N processes, process r trains
on its N-th of the rows. Only the adapter's parameters require grad, so DDP all-reduces (averages) only
those; with equal shares and a mean loss, N processes end with the same adapter as one process that sees
the whole batch, up to float rounding. With ``--fsdp`` the model is sharded with FSDP2's ``fully_shard``
(each decoder layer, then the whole PeftModel) instead of replicated. Process 0 saves the adapter (PEFT's format) to ``--output``.

The model is a tiny random Llama built from its config (no download); put your own model and data in
``build_model`` and ``batches``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import torch
import torch.distributed as dist
from peftkit import LoraConfig, get_peft_model
from peftkit.testing.models import tiny_llama
from torch.nn.parallel import DistributedDataParallel


def build_model(seed: int):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return get_peft_model(tiny_llama(seed=seed), config)


def batches(steps: int, global_batch_size: int, seed: int) -> torch.Tensor:
    """The same token ids on every process: [steps, global batch, sequence]."""
    generator = torch.Generator().manual_seed(seed + 1)
    return torch.randint(1, 128, (steps, global_batch_size, 16), generator=generator)


def trainable(model) -> list[torch.nn.Parameter]:
    return [param for param in model.parameters() if param.requires_grad]


def shard(model):
    """FSDP2: each decoder layer (the base model's ``_no_split_modules``) is one unit, the PeftModel the root.

    fully_shard shards parameter by parameter, so a unit may hold frozen base weights and trainable
    adapter weights together; the optimizer gets only the adapter's (sharded) parameters.
    """
    from torch.distributed.fsdp import fully_shard

    layer_classes = set(getattr(model.get_base_model(), "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module)
    return fully_shard(model)


@contextlib.contextmanager
def full_parameters(model):
    """Under FSDP2, gather the full parameters on every process (a collective) for the time of a save."""
    from torch.distributed.fsdp import FSDPModule

    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


def leave_process_group() -> None:
    """Wait for every process, close the group, and give gloo's worker threads a moment to finish.

    A gloo worker thread drops its last reference to a finished collective after the caller has moved on,
    and freeing a tensor that Python has seen takes the GIL; a thread that asks for the GIL while the
    interpreter is exiting is stopped, which aborts the process ("terminate called without an active
    exception") after the work is done. Sleeping releases the GIL so the threads can finish first; without
    it about one FSDP2 run on the CPU in 15 aborted at exit here, with it none in 70.
    """
    dist.barrier()
    dist.destroy_process_group()
    time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--global-batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerate", action="store_true", help="wrap with accelerate's Accelerator")
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard) instead of DDP")
    args = parser.parse_args()
    torch.set_num_threads(1)

    if args.accelerate and args.fsdp:
        raise SystemExit("--fsdp shards with torch's fully_shard here; for accelerate, configure FSDP in accelerate")
    model = build_model(args.seed)  # same seed everywhere; DDP also copies process 0's weights at wrap time
    if args.accelerate:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        optimizer = torch.optim.SGD(trainable(model), lr=args.lr)
        train_model, optimizer = accelerator.prepare(model, optimizer)
        rank, world, backward = accelerator.process_index, accelerator.num_processes, accelerator.backward
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        train_model = model
        if world > 1:
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            if torch.cuda.is_available():
                device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
                torch.cuda.set_device(device)
                model.to(device)
            train_model = shard(model) if args.fsdp else DistributedDataParallel(model)
        optimizer = torch.optim.SGD(trainable(model), lr=args.lr)  # after fully_shard: it replaces parameters
        backward = torch.Tensor.backward

    if args.global_batch_size % world:
        raise SystemExit(f"--global-batch-size {args.global_batch_size} does not split over {world} processes")
    share = args.global_batch_size // world
    device = next(model.parameters()).device
    for step_batch in batches(args.steps, args.global_batch_size, args.seed):
        rows = step_batch[rank * share : (rank + 1) * share].to(device)
        loss = train_model(input_ids=rows, labels=rows).loss
        backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    with full_parameters(model):
        if rank == 0:
            model.save_pretrained(args.output)  # the PeftModel itself, not the DDP wrapper
            print(f"trained on {world} process(es), final loss of process 0: {loss.item():.4f}; saved {args.output}")
    if world > 1 and dist.is_initialized():
        leave_process_group()


if __name__ == "__main__":
    main()
