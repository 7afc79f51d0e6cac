"""BOFT adapters move between peftkit and PEFT 0.21 with the same outputs, both ways, and merge as PEFT does.

PEFT builds more than one butterfly factor only with its CUDA extension (``fbd_cuda``); without it, on
a CPU, it builds one whatever ``boft_n_butterfly_factor`` says. The cases with more factors run PEFT's
CUDA path on the CPU, with the extension's block-diagonal kernel replaced by ``torch.block_diag``.
"""

from __future__ import annotations

import copy
import json

import peft
import peft.tuners.boft.layer as peft_boft
import peftkit
import pytest
import torch
from peftkit.testing.models import tiny_bert, tiny_llama
from peftkit_boft import BOFTConfig

pytestmark = [
    pytest.mark.numerics,  # also run under torch's generic CPU kernels (dev.sh)
    pytest.mark.filterwarnings("ignore:Failed to load the CUDA extension:UserWarning"),
    pytest.mark.filterwarnings("ignore:Setting boft_n_butterfly_factor to 1:UserWarning"),
]

TOL = dict(rtol=1e-5, atol=1e-5)
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]

CASES = {
    "llama-defaults": (tiny_llama, dict(target_modules=LLAMA_TARGETS)),
    "llama-block-num": (tiny_llama, dict(target_modules=LLAMA_TARGETS, boft_block_size=0, boft_block_num=4)),
    "llama-all-linear-block-size-8": (tiny_llama, dict(target_modules="all-linear", boft_block_size=8)),
    "llama-two-factors": (tiny_llama, dict(target_modules=LLAMA_TARGETS, boft_n_butterfly_factor=2)),
    "llama-three-factors-block-num": (
        tiny_llama,
        dict(target_modules=LLAMA_TARGETS, boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=3),
    ),
    # a classification head and the adapted layers' biases train and are saved with the adapter
    "bert-seq-cls": (tiny_bert, dict(task_type="SEQ_CLS", boft_block_size=8, bias="boft_only")),
    "bert-two-factors": (tiny_bert, dict(boft_block_size=2, boft_n_butterfly_factor=2)),
}


class StubFbdCuda:
    """PEFT's CUDA block-diagonal kernel, as plain torch: ``(N, D, H, H)`` -> ``(N, D·H, D·H)``."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*factor.unbind(0)) for factor in blocks])]


@pytest.fixture
def peft_side(monkeypatch):
    """PEFT as it runs with its CUDA extension (the only way it builds several butterfly factors)."""
    monkeypatch.setattr(peft_boft, "get_fbd_cuda", lambda: StubFbdCuda)


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
    """Rotations, scales and heads moved, as training leaves them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_peftkit_adapter_loads_in_peft_with_same_outputs(case, tmp_path, peft_side):
    build, kwargs = CASES[case]
    base = build()
    pristine = copy.deepcopy(base)
    ours = trained(peftkit.get_peft_model(base, BOFTConfig(**kwargs)))
    expected = logits(ours)
    assert not torch.allclose(expected, logits(pristine), **TOL)
    ours.save_pretrained(tmp_path)

    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path)
    torch.testing.assert_close(logits(theirs), expected, **TOL)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_here_with_same_outputs(case, tmp_path, peft_side):
    build, kwargs = CASES[case]
    base = build()
    pristine = copy.deepcopy(base)
    theirs = trained(peft.get_peft_model(base, peft.BOFTConfig(**kwargs)))
    expected = logits(theirs)
    assert not torch.allclose(expected, logits(pristine), **TOL)
    theirs.save_pretrained(tmp_path)

    ours = peftkit.PeftModel.from_pretrained(pristine, tmp_path)
    torch.testing.assert_close(logits(ours), expected, **TOL)


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_parameters_same_shapes_and_same_merge_as_peft(case, peft_side):
    build, kwargs = CASES[case]
    base = build()
    theirs = trained(peft.get_peft_model(copy.deepcopy(base), peft.BOFTConfig(**kwargs)))
    ours = peftkit.get_peft_model(base, BOFTConfig(**kwargs))
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


def test_an_adapter_peft_saved_without_its_cuda_extension_loads_with_peft_s_outputs(tmp_path, monkeypatch):
    # as on a machine without the extension: PEFT builds one factor although the config asks for two
    monkeypatch.setattr(peft_boft, "get_fbd_cuda", lambda: None)
    base = tiny_llama()
    pristine = copy.deepcopy(base)
    kwargs = dict(target_modules=LLAMA_TARGETS, boft_n_butterfly_factor=2)
    theirs = trained(peft.get_peft_model(base, peft.BOFTConfig(**kwargs)))
    assert theirs.base_model.model.model.layers[0].self_attn.q_proj.boft_R["default"].shape[0] == 1
    expected = logits(theirs)
    theirs.save_pretrained(tmp_path)

    with pytest.warns(UserWarning, match="holds one butterfly factor"):
        ours = peftkit.PeftModel.from_pretrained(pristine, tmp_path)
    assert ours.base_model.model.model.layers[0].self_attn.q_proj.boft_R["default"].shape[0] == 2
    torch.testing.assert_close(logits(ours), expected, **TOL)


def test_saved_files_use_peft_key_names_shapes_and_config_fields(tmp_path):
    from safetensors import safe_open

    model = peftkit.get_peft_model(
        tiny_llama(), BOFTConfig(target_modules=["q_proj", "down_proj"], boft_n_butterfly_factor=2)
    )
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        metadata = handle.metadata()
    config = model.base_model.model.config
    expected = {}
    for i in range(config.num_hidden_layers):
        for path, features, out in (
            ("self_attn.q_proj", config.hidden_size, config.hidden_size),
            ("mlp.down_proj", config.intermediate_size, config.hidden_size),
        ):
            prefix = f"base_model.model.model.layers.{i}.{path}"
            expected[f"{prefix}.boft_R"] = (2, features // 4, 4, 4)
            expected[f"{prefix}.boft_s"] = (out, 1)
    assert shapes == expected
    assert metadata["peftkit.method"] == "boft" and metadata["peftkit.plugin"] == "peftkit-boft"

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(saved) <= set(peft.BOFTConfig().to_dict())
    assert saved["peft_type"] == "BOFT"
    assert (saved["boft_block_size"], saved["boft_block_num"], saved["boft_n_butterfly_factor"]) == (4, 0, 2)


def test_defaults_are_peft_defaults():
    ours, theirs = BOFTConfig(), peft.BOFTConfig()
    for field in (
        "boft_block_size",
        "boft_block_num",
        "boft_n_butterfly_factor",
        "boft_dropout",
        "fan_in_fan_out",
        "bias",
        "init_weights",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "modules_to_save",
    ):
        assert getattr(ours, field) == getattr(theirs, field), field
