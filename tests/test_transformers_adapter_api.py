"""transformers' own adapter API reads adapters that peftkit saved, with the same outputs.

With PEFT installed, ``AutoModelForCausalLM.from_pretrained(adapter_folder)`` loads the base model named
by the folder's ``adapter_config.json`` (``base_model_name_or_path``) and puts the adapter on it, and
``model.load_adapter(folder)`` puts it on a model already loaded. Both hand the folder to PEFT's
``inject_adapter_in_model``, which knows the methods that replace or wrap layers. Prompt methods are not
injected that way, methods PEFT lacks have a ``peft_type`` it cannot read, and a pruned AdaLoRA adapter
needs PEFT's own model to resize its layers: for those, the tests check the refusal that
docs/concepts.md describes, so the page stays true. This file runs under every transformers version
./dev.sh tests (5.x, and 4.57 in its own venv, where a plugin that needs transformers 5 is not installed).
"""

from __future__ import annotations

import json

import peft  # noqa: F401  transformers' adapter API is PEFT's: without peft it loads no adapter
import peftkit
import pytest
import torch
import transformers
from peftkit import plugins
from peftkit.testing.models import randomize_trainable, tiny_llama
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.numerics  # PEFT interop: also run under torch's generic CPU kernels (dev.sh)

TOL = dict(rtol=1e-5, atol=1e-5)
ATTENTION_AND_MLP = ["q_proj", "v_proj", "down_proj"]

# Methods whose files transformers loads: PEFT replaces or wraps the targeted layers for each.
LOADABLE = {
    "lora": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "lora-patterns-rslora": dict(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=ATTENTION_AND_MLP,
        rank_pattern={"v_proj": 2},
        alpha_pattern={r"layers\.1\.mlp\.down_proj": 16},
    ),
    "lora-modules-to-save": dict(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    "loha": dict(r=4, alpha=8, target_modules=ATTENTION_AND_MLP),
    "lokr": dict(r=4, alpha=8, target_modules=ATTENTION_AND_MLP),
    "ia3": dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "adalora": dict(init_r=4, target_r=2, total_step=10, target_modules=ATTENTION_AND_MLP),
}


TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
DORA = dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"])


def method_of(case: str) -> str:
    return case.split("-")[0]


def config_for(method: str, **fields):
    spec = plugins.methods().get(method)
    assert spec is not None, f"the {method} plugin is not installed"
    return spec.config_class(task_type="CAUSAL_LM", **fields)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """A tiny Llama saved as a base model: what an adapter's base_model_name_or_path names."""
    folder = tmp_path_factory.mktemp("base") / "tiny-llama"
    tiny_llama().save_pretrained(folder)
    return folder


def load_base(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 128, (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on one row
    return dict(input_ids=ids, attention_mask=mask)


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch()).logits


def save_adapter(base_folder, folder, method: str, **fields) -> torch.Tensor:
    """A peftkit adapter with random (trained-like) weights on the saved base, saved to ``folder``;
    returns the peftkit model's logits."""
    model = peftkit.get_peft_model(load_base(base_folder), config_for(method, **fields))
    randomize_trainable(model, scale=0.3)
    expected = logits(model)
    assert (expected - logits(load_base(base_folder))).abs().max() > 1e-2, "the adapter changes nothing"
    model.save_pretrained(folder)
    return expected


@pytest.mark.parametrize("case", sorted(LOADABLE))
def test_auto_model_from_pretrained_loads_a_peftkit_adapter_folder(case, base_folder, tmp_path):
    expected = save_adapter(base_folder, tmp_path / "adapter", method_of(case), **LOADABLE[case])
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(base_folder)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter")

    assert list(loaded.peft_config) == ["default"]
    torch.testing.assert_close(logits(loaded), expected, **TOL)


@pytest.mark.parametrize("case", sorted(LOADABLE))
def test_load_adapter_puts_a_peftkit_adapter_on_a_loaded_model(case, base_folder, tmp_path):
    expected = save_adapter(base_folder, tmp_path / "adapter", method_of(case), **LOADABLE[case])
    model = load_base(base_folder)

    model.load_adapter(str(tmp_path / "adapter"), adapter_name="mine")

    assert model.active_adapters() == ["mine"]
    torch.testing.assert_close(logits(model), expected, **TOL)
    model.disable_adapters()
    torch.testing.assert_close(logits(model), logits(load_base(base_folder)), rtol=0, atol=0)


def test_a_dora_adapter_loads_whole_on_transformers_4_and_without_its_magnitude_on_5(base_folder, tmp_path):
    """transformers 5's adapter loading leaves DoRA's magnitude (saved as ``lora_magnitude_vector``, without
    ``.weight``) unread and freshly initialised, with a load report, for PEFT's own DoRA files as for
    these; transformers 4 loads it. docs/concepts.md says so: when a transformers release reads it, this
    fails, and the docs change with it."""
    expected = save_adapter(base_folder, tmp_path / "adapter", "lora", **DORA)
    through_auto = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter")
    through_load_adapter = load_base(base_folder)
    through_load_adapter.load_adapter(str(tmp_path / "adapter"))
    for loaded in (through_auto, through_load_adapter):
        if TRANSFORMERS_5:
            assert (logits(loaded) - expected).abs().max() > 1e-3, "transformers 5 now reads DoRA's magnitude"
        else:
            torch.testing.assert_close(logits(loaded), expected, **TOL)


def test_two_peftkit_adapters_load_side_by_side_and_switch(base_folder, tmp_path):
    first = save_adapter(base_folder, tmp_path / "first", "lora", r=4, target_modules=["q_proj", "v_proj"])
    second = save_adapter(base_folder, tmp_path / "second", "loha", r=2, target_modules=["k_proj", "o_proj"])
    model = load_base(base_folder)
    model.load_adapter(str(tmp_path / "first"), adapter_name="first")
    model.load_adapter(str(tmp_path / "second"), adapter_name="second")

    model.set_adapter("second")
    torch.testing.assert_close(logits(model), second, **TOL)
    model.set_adapter("first")
    torch.testing.assert_close(logits(model), first, **TOL)


def test_a_lora_trained_with_peftkit_generates_the_same_tokens_through_transformers(base_folder, tmp_path):
    """LoRA trains, saves, loads (in peftkit and in transformers) and generates the same tokens."""
    config = config_for("lora", r=4, target_modules="all-linear")
    model = peftkit.get_peft_model(load_base(base_folder), config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = batch()
    losses = []
    for _ in range(8):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    model.eval()
    model.save_pretrained(tmp_path / "trained")

    prompt = dict(input_ids=batch()["input_ids"][:1, :4])
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        tokens = model.generate(**prompt, **settings)
        reloaded = peftkit.PeftModel.from_pretrained(load_base(base_folder), tmp_path / "trained")
        through_transformers = AutoModelForCausalLM.from_pretrained(tmp_path / "trained").eval()
        base_tokens = load_base(base_folder).generate(**prompt, **settings)

    assert tokens.shape == (1, 10)
    assert not torch.equal(tokens, base_tokens), "training changed no generated token"
    assert torch.equal(reloaded.generate(**prompt, **settings), tokens)
    assert torch.equal(through_transformers.generate(**prompt, **settings), tokens)


# Methods whose files transformers cannot load, and the error that says so (docs/concepts.md): PEFT
# injects no prompt method into a model's layers, and has no bottleneck adapters or BitFit.
NO_PROMPTS = "does not support prompt learning"
NOT_LOADABLE = {
    "prompt_tuning": (dict(num_virtual_tokens=4), ValueError, NO_PROMPTS),
    "prefix_tuning": (dict(num_virtual_tokens=4), ValueError, NO_PROMPTS),
    "p_tuning": (dict(num_virtual_tokens=4, encoder_hidden_size=16), ValueError, NO_PROMPTS),
    "bottleneck": (dict(), KeyError, "BOTTLENECK"),
    "bitfit": (dict(), KeyError, "BITFIT"),
}


# peftkit-prefix-tuning declares transformers>=5, so the transformers 4 test environment does not install it
NEEDS_TRANSFORMERS_5 = {"prefix_tuning"}


@pytest.mark.parametrize(
    "method",
    [
        pytest.param(
            method,
            marks=pytest.mark.skipif(
                not TRANSFORMERS_5, reason=f"peftkit-{method.replace('_', '-')} requires transformers>=5"
            ),
        )
        if method in NEEDS_TRANSFORMERS_5
        else method
        for method in sorted(NOT_LOADABLE)
    ],
)
def test_methods_transformers_cannot_inject_are_refused_there(method, tmp_path):
    fields, error, message = NOT_LOADABLE[method]
    # BitFit needs biases, which Llama leaves out by default
    biased = dict(attention_bias=True, mlp_bias=True)
    model = peftkit.get_peft_model(tiny_llama(**biased), config_for(method, **fields))
    model.save_pretrained(tmp_path / "adapter")

    with pytest.raises(error, match=message):
        tiny_llama(**biased).load_adapter(str(tmp_path / "adapter"))


def test_an_adalora_adapter_pruned_by_its_budget_is_refused_there(base_folder, tmp_path):
    """After the budget allocation the config holds a rank_pattern and the tensors have the kept ranks:
    transformers 4 asks the model for PEFT's resize method (which only PEFT's own model has), and
    transformers 5 refuses the smaller tensors. PEFT's own pruned files fare the same."""
    schedule = dict(init_r=6, target_r=2, total_step=6, tinit=1, tfinal=2, deltaT=1, lora_alpha=16)
    model = peftkit.get_peft_model(
        load_base(base_folder), config_for("adalora", target_modules=["q_proj", "v_proj"], **schedule)
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = batch()
    model.train()
    for step in range(schedule["total_step"]):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    assert model.peft_config["default"].rank_pattern, "the budget allocation pruned nothing"
    model.save_pretrained(tmp_path / "pruned")

    with pytest.raises((AttributeError, RuntimeError), match="resize_modules_by_rank_pattern|mismatched"):
        load_base(base_folder).load_adapter(str(tmp_path / "pruned"))
