"""The core's side of other libraries' formats: a plugin that reads one (peftkit_read_foreign_adapter) is asked
for every folder that is not PEFT's, by from_pretrained, load_adapter and `peftkit inspect`; one that writes
one (peftkit_save_foreign_adapter) answers save_pretrained(format=...). A toy format stands in here: LoRA's
two factors as `toy.json` and `toy.safetensors`, keyed by module path."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from peftkit import (
    AdapterLoadError,
    ConfigError,
    LoraConfig,
    PeftModel,
    get_peft_model,
    hookimpl,
    method_impl,
    plugins,
)
from peftkit.cli import make_cli
from peftkit.foreign_format import ForeignAdapter
from peftkit.testing.models import randomize_trainable, tiny_bert, tiny_llama
from safetensors.torch import load_file, save_file

IDS = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(0))
ROOT = "base_model.model."


class ToyFormat:
    """Reads and writes LoRA adapters as `toy.json` (rank, alpha, targets) and `toy.safetensors`."""

    def __init__(self):
        self.asked = []

    @hookimpl
    def peftkit_read_foreign_adapter(self, folder, model):
        self.asked.append(folder.name)
        if not (folder / "toy.json").is_file():
            return None
        source = json.loads((folder / "toy.json").read_text())
        tensors = load_file(folder / "toy.safetensors")
        adapter = ForeignAdapter("toy", "lora", folder / "toy.safetensors", source, tensors)
        if model is not None:
            adapter.config = LoraConfig(
                r=source["r"], lora_alpha=source["alpha"], target_modules=source["targets"]
            )
            adapter.tensors = {
                ROOT + key.replace(".A", ".lora_A.weight").replace(".B", ".lora_B.weight"): t
                for key, t in tensors.items()
            }
        return adapter

    @method_impl("lora")
    def peftkit_save_foreign_adapter(self, peft_model, config, adapter_name, format, folder):
        if format != "toy":
            return None
        (folder / "toy.json").write_text(
            json.dumps({"r": config.r, "alpha": config.lora_alpha, "targets": sorted(config.target_modules)})
        )
        state = {
            key.removeprefix(ROOT): t
            for key, t in peft_model.state_dict().items()
            if f".{adapter_name}." in key
        }
        tensors = {
            key.replace(f".lora_A.{adapter_name}.weight", ".A").replace(
                f".lora_B.{adapter_name}.weight", ".B"
            ): t.contiguous()
            for key, t in state.items()
        }
        save_file(tensors, folder / "toy.safetensors")
        return True


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture
def toy():
    with plugins.registered(ToyFormat(), name="toy-format") as plugin:
        yield plugin


def test_a_format_a_plugin_writes_reads_back_through_from_pretrained_and_load_adapter(toy, tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    randomize_trainable(model)
    model.save_pretrained(tmp_path / "toy", format="toy")
    assert sorted(p.name for p in (tmp_path / "toy").iterdir()) == ["toy.json", "toy.safetensors"]

    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "toy")
    assert torch.equal(logits(loaded), logits(model))
    other = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["v_proj"]))
    other.load_adapter(tmp_path / "toy", "toy")
    other.set_adapter("toy")
    assert torch.equal(logits(other), logits(model))


def test_peft_folders_are_never_offered_to_the_plugins(toy, tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "peft")
    PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    assert toy.asked == []


def test_inspect_shows_a_folder_that_a_plugin_reads(toy, tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "toy", format="toy")
    result = CliRunner().invoke(make_cli(), ["inspect", str(tmp_path / "toy"), "--json"], prog_name="peftkit")
    assert result.exit_code == 0, result.output
    [adapter] = json.loads(result.output)["adapters"]
    assert (adapter["format"], adapter["method"], adapter["peft_type"]) == ("toy", "lora", "LORA")
    assert adapter["config"] == {"r": 2, "alpha": 4, "targets": ["q_proj"]}
    assert len(adapter["tensors"]) == 4  # A and B in each of the 2 layers


def test_a_format_no_plugin_writes_is_a_clear_error_and_writes_nothing(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError) as info:
        model.save_pretrained(tmp_path / "out", format="toy")
    assert str(info.value) == (
        "adapter 'default' is a lora adapter, and no installed plugin writes lora adapters in format 'toy'; "
        "format='peft' (the default) writes every method"
    )
    with pytest.raises(ConfigError) as info:
        model.save_pretrained(tmp_path / "out", format=None)
    assert str(info.value) == "save_pretrained's format must be a format's name, such as 'peft', got None"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("config", "said"),
    [
        ({"architecture": "prefix_tuning", "prefix_length": 30}, "architecture 'prefix_tuning'"),
        (
            {
                "architecture": "union",
                "configs": [{"architecture": "prefix_tuning"}, {"architecture": "bottleneck"}],
            },
            "a union of architecture 'prefix_tuning' \\+ architecture 'bottleneck'",
        ),
    ],
)
def test_an_adapterhub_folder_no_plugin_reads_is_named_with_its_architecture(tmp_path, config, said):
    # what AdapterHub's save_adapter writes for its prefix tuning, and for MAMConfig (a union)
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"config": config, "name": "x", "model_type": "bert"})
    )
    with pytest.raises(
        AdapterLoadError, match=f"holds an AdapterHub adapter \\({said}\\), and no installed plugin"
    ):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)
