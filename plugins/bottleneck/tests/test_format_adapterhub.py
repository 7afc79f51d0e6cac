"""AdapterHub's folder layout without AdapterHub: written by save_pretrained(format="adapterhub"), read back by
from_pretrained, load_adapter and `peftkit inspect`, and the errors for what peftkit does not read.

The same files against AdapterHub's adapters library itself: test_adapterhub_equality.py (transformers 4 stage).
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from peftkit import AdapterLoadError, ConfigError, PeftModel, get_peft_model
from peftkit.cli import make_cli
from peftkit.testing.models import randomize_trainable, tiny_bert, tiny_llama
from peftkit_bottleneck import BottleneckConfig, BottleneckLayer
from safetensors.torch import load_file

IDS = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def saved_for_adapterhub(folder, style="pfeiffer", build=tiny_bert):
    model = get_peft_model(build(), BottleneckConfig(style=style, reduction_factor=4))
    randomize_trainable(model, scale=0.3)
    model.save_pretrained(folder, format="adapterhub")
    return model


def edit_config(folder, **options):
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    data["config"].update(options)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("style", ["houlsby", "pfeiffer", "parallel"])
def test_an_adapter_written_in_adapterhubs_layout_reads_back_with_the_same_outputs(style, tmp_path):
    model = saved_for_adapterhub(tmp_path, style)

    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["name"] == "default" and data["model_type"] == "bert"
    assert data["config"]["mh_adapter"] is (style == "houlsby")
    assert data["config"]["is_parallel"] is (style == "parallel")
    tensors = load_file(tmp_path / "adapter.safetensors")
    # AdapterHub keeps BERT's feed-forward adapters in BertOutput, its down projection a Sequential's first layer
    assert "bert.encoder.layer.1.output.adapters.default.adapter_down.0.weight" in tensors
    assert sorted(torch.load(tmp_path / "pytorch_adapter.bin", weights_only=True)) == sorted(tensors)

    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert loaded.peft_config["default"].style == style
    assert torch.equal(logits(loaded), logits(model))


def test_load_adapter_adds_an_adapterhub_folder_beside_other_adapters(tmp_path):
    saved = saved_for_adapterhub(tmp_path, "houlsby")
    model = get_peft_model(tiny_bert(), BottleneckConfig(style="pfeiffer"))
    model.load_adapter(tmp_path, "hub")
    model.set_adapter("hub")
    assert torch.equal(logits(model), logits(saved))


def test_pfeiffer_reads_the_normalised_residual_sum_on_bert_and_the_layer_output_on_llama():
    bert = get_peft_model(tiny_bert(), BottleneckConfig(style="pfeiffer"))
    norm = bert.get_submodule("base_model.model.bert.encoder.layer.0.output.LayerNorm")
    randomize_trainable(bert, scale=0.3)
    s = torch.randn(2, 5, 32)
    down, up = norm.adapter_down["default"], norm.adapter_up["default"]
    with torch.no_grad():
        z = norm.base_layer(s)
        expected = norm.base_layer(s + up(torch.relu(down(z))))
        assert torch.allclose(norm(s), expected, atol=1e-6)
    llama = get_peft_model(tiny_llama(), BottleneckConfig(style="pfeiffer"))
    assert isinstance(llama.get_submodule("base_model.model.model.layers.0"), BottleneckLayer)


def test_a_config_saved_before_original_ln_before_keeps_its_placement(tmp_path):
    model = get_peft_model(tiny_bert(), BottleneckConfig(style="pfeiffer", original_ln_before=False))
    randomize_trainable(model)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    del data["original_ln_before"]  # as peftkit-bottleneck 0.1 wrote it
    path.write_text(json.dumps(data))
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert loaded.peft_config["default"].original_ln_before is False
    assert torch.equal(logits(loaded), logits(model))


# --- what is refused, and why ---------------------------------------------------------------------------
def test_an_adapterhub_option_peftkit_cannot_represent_is_a_clear_error(tmp_path):
    saved_for_adapterhub(tmp_path)
    edit_config(tmp_path, ln_after=True)
    with pytest.raises(AdapterLoadError) as info:
        PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert str(info.value) == (
        f"{str(tmp_path / 'adapter_config.json')!r} sets the AdapterHub option ln_after=True, which "
        "peftkit-bottleneck cannot represent (it reads ln_after=False only); load this adapter with AdapterHub's "
        "adapters library instead"
    )


def test_an_adapterfusion_folder_needs_its_fused_adapters_loaded_first(tmp_path):
    (tmp_path / "adapter_fusion_config.json").write_text(
        json.dumps({"config": {"key": True}, "adapter_names": ["a", "b"], "name": "a,b"})
    )
    torch.save({}, tmp_path / "pytorch_model_adapter_fusion.bin")
    with pytest.raises(AdapterLoadError, match=r"holds the adapters \['a', 'b'\] together in no block; load the"):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)


def test_an_adapterfusion_folder_without_its_adapter_names_is_refused(tmp_path):
    (tmp_path / "adapter_fusion_config.json").write_text(json.dumps({"config": {"key": True}, "name": "a,b"}))
    with pytest.raises(AdapterLoadError, match="has no AdapterFusion 'config' and 'adapter_names'"):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)


class NotATensor:
    pass


def test_a_pickle_that_is_not_weights_only_is_refused(tmp_path):
    saved_for_adapterhub(tmp_path)
    (tmp_path / "adapter.safetensors").unlink()
    torch.save({"payload": NotATensor()}, tmp_path / "pytorch_adapter.bin")
    with pytest.raises(AdapterLoadError) as info:
        PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert str(info.value).startswith(
        f"{str(tmp_path / 'pytorch_adapter.bin')!r} is not a weights-only torch file, so peftkit does not read it"
    )


def test_an_unknown_format_and_named_blocks_are_refused_on_save(tmp_path):
    model = get_peft_model(tiny_bert(), BottleneckConfig())
    with pytest.raises(ConfigError) as info:
        model.save_pretrained(tmp_path / "a", format="adapters-hub")
    assert str(info.value) == (
        "adapter 'default' is a bottleneck adapter, and no installed plugin writes bottleneck adapters in format "
        "'adapters-hub'; format='peft' (the default) writes every method"
    )
    named = get_peft_model(tiny_bert(), BottleneckConfig(feedforward_modules=["output.dense"]))
    with pytest.raises(
        ConfigError, match=r"sets BottleneckConfig\.feedforward_modules=\['output\.dense'\], which"
    ):
        named.save_pretrained(tmp_path / "b", format="adapterhub")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --- peftkit inspect ------------------------------------------------------------------------------------
def test_inspect_shows_an_adapterhub_folder(tmp_path):
    saved_for_adapterhub(tmp_path, "houlsby")
    (tmp_path / "head_config.json").write_text("{}")
    result = CliRunner().invoke(make_cli(), ["inspect", str(tmp_path), "--json"], prog_name="peftkit")
    assert result.exit_code == 0, result.output
    [adapter] = json.loads(result.output)["adapters"]
    assert (adapter["format"], adapter["method"], adapter["file"]) == (
        "adapterhub",
        "bottleneck",
        "adapter.safetensors",
    )
    assert adapter["config"]["config"]["mh_adapter"] is True
    # 2 layers, after the attention and the feed-forward block, 4 tensors each
    assert len(adapter["tensors"]) == 16
    assert adapter["notes"] == ["head_config.json: a prediction head, which peftkit does not load"]
    table = CliRunner().invoke(make_cli(), ["inspect", str(tmp_path)], prog_name="peftkit")
    assert "adapterhub folder; PeftModel.from_pretrained loads it as a bottleneck adapter" in table.output
