"""OFT adapters move between peftkit and PEFT 0.21 with the same outputs, both ways, and merge as PEFT does."""

from __future__ import annotations

import copy
import json

import peft
import peftkit
import pytest
import torch
from peftkit.testing.models import tiny_bert, tiny_llama
from peftkit_oft import OFTConfig

pytestmark = pytest.mark.numerics  # also run under torch's generic CPU kernels (dev.sh)

TOL = dict(rtol=1e-5, atol=1e-5)
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]

CASES = {
    "llama-block-size": (tiny_llama, dict(target_modules=LLAMA_TARGETS, oft_block_size=8)),
    "llama-r": (tiny_llama, dict(target_modules=LLAMA_TARGETS, r=4, oft_block_size=0)),
    "llama-exact-cayley": (
        tiny_llama,
        dict(target_modules="all-linear", oft_block_size=16, use_cayley_neumann=False),
    ),
    "llama-neumann-3-terms": (
        tiny_llama,
        dict(target_modules=LLAMA_TARGETS, oft_block_size=8, num_cayley_neumann_terms=3),
    ),
    "llama-coft": (tiny_llama, dict(target_modules=LLAMA_TARGETS, oft_block_size=8, coft=True, eps=0.3)),
    "llama-block-share": (
        tiny_llama,
        dict(target_modules=LLAMA_TARGETS, r=2, oft_block_size=0, block_share=True),
    ),
    # 12 does not divide 32: both adjust it to the nearest divisor
    "llama-adjusted-block-size": (tiny_llama, dict(target_modules=["q_proj"], oft_block_size=12)),
    "llama-defaults": (tiny_llama, dict()),
    # a classification head and the adapted layers' biases train and are saved with the adapter
    "bert-seq-cls": (tiny_bert, dict(task_type="SEQ_CLS", oft_block_size=8, bias="oft_only")),
    "bert-r-coft-share": (
        tiny_bert,
        # no task_type (no saved head): PEFT saves a head's bias twice under bias="all", which peftkit's core
        # does not place yet, for any method
        dict(r=4, oft_block_size=0, coft=True, eps=0.5, block_share=True, bias="all"),
    ),
}


def inputs():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 128, (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return dict(input_ids=ids, attention_mask=mask)


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(**inputs()).logits


def trained(model, seed=2):
    """Skew-symmetric parameters and heads moved, as training leaves them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.filterwarnings("ignore:.*oft_block_size.*:UserWarning")
@pytest.mark.filterwarnings("ignore:Invalid `oft_block_size`:UserWarning")
def test_peftkit_adapter_loads_in_peft_with_same_outputs(case, tmp_path):
    build, kwargs = CASES[case]
    base = build()
    pristine = copy.deepcopy(base)
    ours = trained(peftkit.get_peft_model(base, OFTConfig(**kwargs)))
    expected = logits(ours)
    assert not torch.allclose(expected, logits(pristine), **TOL)
    ours.save_pretrained(tmp_path)

    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path)
    torch.testing.assert_close(logits(theirs), expected, **TOL)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.filterwarnings("ignore:.*oft_block_size.*:UserWarning")
@pytest.mark.filterwarnings("ignore:Invalid `oft_block_size`:UserWarning")
def test_peft_adapter_loads_here_with_same_outputs(case, tmp_path):
    build, kwargs = CASES[case]
    base = build()
    pristine = copy.deepcopy(base)
    theirs = trained(peft.get_peft_model(base, peft.OFTConfig(**kwargs)))
    expected = logits(theirs)
    assert not torch.allclose(expected, logits(pristine), **TOL)
    theirs.save_pretrained(tmp_path)

    ours = peftkit.PeftModel.from_pretrained(pristine, tmp_path)
    torch.testing.assert_close(logits(ours), expected, **TOL)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.filterwarnings("ignore:.*oft_block_size.*:UserWarning")
@pytest.mark.filterwarnings("ignore:Invalid `oft_block_size`:UserWarning")
def test_same_parameters_same_shapes_and_same_merge_as_peft(case):
    build, kwargs = CASES[case]
    base = build()
    theirs = trained(peft.get_peft_model(copy.deepcopy(base), peft.OFTConfig(**kwargs)))
    ours = peftkit.get_peft_model(base, OFTConfig(**kwargs))
    their_params = {
        name.replace(".default", ""): p for name, p in theirs.named_parameters() if p.requires_grad
    }
    our_params = {name.replace(".default", ""): p for name, p in ours.named_parameters() if p.requires_grad}
    assert {k: tuple(v.shape) for k, v in our_params.items()} == {
        k: tuple(v.shape) for k, v in their_params.items()
    }
    with torch.no_grad():
        for name, param in our_params.items():
            param.copy_(their_params[name])
    merged_theirs = theirs.merge_and_unload()
    merged_ours = ours.merge_and_unload()
    torch.testing.assert_close(logits(merged_ours), logits(merged_theirs), **TOL)
    torch.testing.assert_close(merged_ours.state_dict(), merged_theirs.state_dict(), **TOL)


def test_saved_files_use_peft_key_names_shapes_and_config_fields(tmp_path):
    from safetensors import safe_open

    model = peftkit.get_peft_model(
        tiny_llama(), OFTConfig(target_modules=["q_proj", "down_proj"], oft_block_size=8)
    )
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        metadata = handle.metadata()
    intermediate = model.base_model.model.config.intermediate_size
    assert shapes == {
        f"base_model.model.model.layers.{i}.{path}.oft_R.weight": shape
        for i in (0, 1)
        for path, shape in (("self_attn.q_proj", (32 // 8, 28)), ("mlp.down_proj", (intermediate // 8, 28)))
    }
    assert metadata["peftkit.method"] == "oft" and metadata["peftkit.plugin"] == "peftkit-oft"

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(config) <= set(peft.OFTConfig().to_dict())
    assert config["peft_type"] == "OFT"
    defaults = peft.OFTConfig()
    for field in (
        "r",
        "module_dropout",
        "coft",
        "eps",
        "block_share",
        "use_cayley_neumann",
        "num_cayley_neumann_terms",
    ):
        assert config[field] == getattr(defaults, field), field
    assert config["oft_block_size"] == 8


def test_defaults_are_peft_defaults():
    ours, theirs = OFTConfig(), peft.OFTConfig()
    for field in (
        "r",
        "oft_block_size",
        "module_dropout",
        "fan_in_fan_out",
        "bias",
        "init_weights",
        "coft",
        "eps",
        "block_share",
        "use_cayley_neumann",
        "num_cayley_neumann_terms",
    ):
        assert getattr(ours, field) == getattr(theirs, field), field
