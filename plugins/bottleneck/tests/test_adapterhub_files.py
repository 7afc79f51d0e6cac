"""Folders that AdapterHub's adapters 1.3 writes and peftkit refuses or only describes: a config option
peftkit-bottleneck cannot represent, an AdapterFusion folder, and `peftkit inspect` on a save_adapter folder
with a prediction head.

Needs adapters 1.3 (transformers 4.57): the transformers 4 stage runs this file, the first stage leaves it out.
"""

from __future__ import annotations

import json

import adapters
import pytest
from adapters import SeqBnConfig
from adapters.composition import Fuse
from click.testing import CliRunner
from peftkit import AdapterLoadError, PeftModel
from peftkit.cli import make_cli
from peftkit.testing.models import tiny_bert


def with_adapters(*configs):
    model = tiny_bert()
    adapters.init(model)
    for index, config in enumerate(configs):
        model.add_adapter(f"a{index}", config=config)
    return model


def test_an_option_peftkit_cannot_represent_is_named_in_the_error(tmp_path):
    with_adapters(SeqBnConfig(ln_after=True)).save_adapter(str(tmp_path), "a0")
    with pytest.raises(
        AdapterLoadError, match=r"sets the AdapterHub option ln_after=True, which peftkit-bottleneck"
    ):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)


def test_an_adapterfusion_folder_loads_only_after_its_adapters_and_inspect_reads_it(tmp_path):
    model = with_adapters(SeqBnConfig(), SeqBnConfig())
    model.add_adapter_fusion(Fuse("a0", "a1"))
    model.save_adapter_fusion(str(tmp_path), "a0,a1")
    with pytest.raises(AdapterLoadError, match=r"holds the adapters \['a0', 'a1'\] together in no block; load the"):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)
    result = CliRunner().invoke(make_cli(), ["inspect", str(tmp_path), "--json"], prog_name="peftkit")
    assert result.exit_code == 0, result.output
    [adapter] = json.loads(result.output)["adapters"]
    assert (adapter["format"], adapter["method"], adapter["file"]) == (
        "adapterhub",
        "adapter_fusion",
        "pytorch_model_adapter_fusion.bin",
    )
    assert adapter["config"]["adapter_names"] == ["a0", "a1"]


def test_inspect_reads_a_save_adapter_folder_and_names_its_head(tmp_path):
    with_adapters(SeqBnConfig(reduction_factor=4)).save_adapter(str(tmp_path), "a0")
    result = CliRunner().invoke(make_cli(), ["inspect", str(tmp_path), "--json"], prog_name="peftkit")
    assert result.exit_code == 0, result.output
    [adapter] = json.loads(result.output)["adapters"]
    assert (adapter["format"], adapter["method"], adapter["file"]) == (
        "adapterhub",
        "bottleneck",
        "pytorch_adapter.bin",
    )
    assert adapter["config"]["config"]["original_ln_before"] is True
    assert "bert.encoder.layer.0.output.adapters.a0.adapter_down.0.weight" in {
        t["name"] for t in adapter["tensors"]
    }
    assert "pytorch_model_head.bin: a prediction head, which peftkit does not load" in adapter["notes"]
