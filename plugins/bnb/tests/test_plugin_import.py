"""Loading the backend imports nothing of bitsandbytes' until a model holds one of its layers.

Each check runs in a fresh interpreter: the tests around this one import bitsandbytes themselves.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# every installed plugin loaded, then a LoRA model on a plain base trained, merged and saved: every layer
# hook is asked about plain layers, and the backend answers None without importing bitsandbytes
PLAIN_MODEL = """
import json, sys, tempfile
import torch
import peftkit
from peftkit import plugins
from peftkit.testing.models import tiny_llama

host = plugins.host()
assert "bnb" in host.origins, sorted(host.origins)
model = peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(r=2, target_modules="all-linear"))
ids = torch.tensor([[3, 4, 5, 6]])
model(input_ids=ids, labels=ids).loss.backward()
with tempfile.TemporaryDirectory() as folder:
    model.save_pretrained(folder)
merged = model.merge_and_unload()(input_ids=ids).logits
print(json.dumps({name: name in sys.modules for name in ("bitsandbytes", "peftkit_bnb.layers")}))
"""

# once bitsandbytes is imported, the same hooks answer for its layers
BNB_LAYER = """
import json
import bitsandbytes as bnb
from peftkit import plugins

features = plugins.layer_features(bnb.nn.Linear4bit(64, 32))
print(json.dumps([features.kind, features.in_features, features.out_features, features.quantized]))
"""


def _last_json_line(script: str):
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1])


def test_plugins_and_a_lora_model_on_a_plain_base_never_import_bitsandbytes():
    assert _last_json_line(PLAIN_MODEL) == {"bitsandbytes": False, "peftkit_bnb.layers": False}


def test_once_bitsandbytes_is_imported_its_layers_are_the_backends():
    assert _last_json_line(BNB_LAYER) == ["linear", 64, 32, True]


# a quantized base loaded as `peftkit merge` loads it (the one place peftkit makes bitsandbytes load), or
# directly with transformers: bitsandbytes' notice about its optional CPU kernel shows only in the latter
LOAD_QUANTIZED = """
import sys
from pathlib import Path

if sys.argv[2] == "peftkit":
    from peftkit.merge_folder import load_base

    load_base(Path(sys.argv[1]), None)
else:
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True)
print("loaded")
"""
KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def test_peftkit_merge_loads_a_quantized_base_without_bitsandbytes_kernel_notice(tmp_path):
    from peftkit.testing.models import tiny_llama
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama(seed=1).save_pretrained(tmp_path / "plain")
    quantized = AutoModelForCausalLM.from_pretrained(
        tmp_path / "plain", quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map="cpu"
    )
    quantized.save_pretrained(tmp_path / "nf4")
    runs = {
        how: subprocess.run(
            [sys.executable, "-c", LOAD_QUANTIZED, str(tmp_path / "nf4"), how],
            capture_output=True,
            text=True,
            timeout=300,
        )
        for how in ("transformers", "peftkit")
    }
    for run in runs.values():
        assert run.stdout.strip() == "loaded", run.stderr
    assert KERNEL_NOTICE not in runs["peftkit"].stderr
    if KERNEL_NOTICE not in runs["transformers"].stderr:
        # bitsandbytes logs it only on CPUs with AVX512-BF16 and without the `kernels` package
        pytest.skip("bitsandbytes gives no kernel notice on this machine, so there is none to drop")
