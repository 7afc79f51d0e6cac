"""LoRA under torch.compile with inductor, the compiler users train with: one graph at any dropout.

The conformance kit checks every method with the aot_eager backend (tracing only); this compiles code.
"""

from __future__ import annotations

import pytest
import torch
from peftkit import LoraConfig, get_peft_model
from peftkit.testing.models import tiny_llama

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_training_step_compiles_whole_with_inductor_and_never_recompiles(dropout):
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=ALL_LINEAR, lora_dropout=dropout))
    model.train()
    ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    step = torch.compile(lambda: model(input_ids=ids, labels=ids).loss, fullgraph=True)
    losses = []
    for call in range(3):
        with torch._dynamo.config.patch(error_on_recompile=call > 0):
            loss = step()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_compiled_outputs_and_gradients_are_the_eager_ones_without_dropout():
    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=ALL_LINEAR, init_lora_weights=False)
    model = get_peft_model(tiny_llama(), config).train()
    ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(1))

    def loss_and_grads(run):
        model.zero_grad()
        loss = run()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    eager_loss, eager_grads = loss_and_grads(lambda: model(input_ids=ids, labels=ids).loss)
    compiled = torch.compile(lambda: model(input_ids=ids, labels=ids).loss, fullgraph=True)
    loss, grads = loss_and_grads(compiled)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
