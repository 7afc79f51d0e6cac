"""``peftkit targets`` and ``peftkit plan``: models built from config.json on the meta device.

End-to-end runs go through subprocesses, started together by one fixture (each pays for importing
torch and transformers). Tables, error messages and the arithmetic run in-process with click's runner.
The 7B numbers are Llama-2-7B's with LoRA r=16 on all linear layers, as PEFT reports them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from peftkit.cli import make_cli
from peftkit.planning import group_pattern, parse_options, safetensors_size
from peftkit.testing.models import tiny_gpt2, tiny_llama
from transformers import LlamaConfig

LLAMA_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
)
TINY_LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peftkit(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "peftkit", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    LlamaConfig(**LLAMA_7B).save_pretrained(root / "llama-7b")  # no architectures: a causal LM is chosen
    tiny_llama().config.save_pretrained(root / "tiny-llama")
    tiny_gpt2().config.save_pretrained(root / "tiny-gpt2")
    return {path.name: path for path in root.iterdir()}


@pytest.fixture(scope="module")
def runs(models) -> dict[str, subprocess.CompletedProcess]:
    commands = {
        "plan 7b": ["plan", str(models["llama-7b"]), "--method", "lora", "--option", "r=16",
                    "--option", "target_modules=all-linear", "--json"],
        "targets tiny lora": ["targets", str(models["tiny-llama"]), "-m", "lora",
                              "-o", 'target_modules=["q_proj", "v_proj"]', "-o", "layers_to_transform=[1]", "--json"],
    }  # fmt: skip
    started = {name: _peftkit(*args) for name, args in commands.items()}
    done = {}
    for name, process in started.items():
        stdout, stderr = process.communicate(timeout=300)
        done[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return done


def ok(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 0, run.stderr
    return run.stdout


def invoke(*args: str):
    return CliRunner().invoke(make_cli(), list(args), prog_name="peftkit")


def error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.stderr.strip().splitlines()[-1]


# --- peftkit plan: the 7B numbers ------------------------------------------------------------------
def test_plan_llama_7b_lora_all_linear_counts(runs):
    report = json.loads(ok(runs["plan 7b"]))
    assert report["trainable_params"] == 39_976_960
    assert report["total_params"] == 6_778_392_576
    assert report["model_class"] == "LlamaForCausalLM"
    assert report["adapted_modules"] == 7 * 32
    assert report["adapted_names"] == sorted(TINY_LLAMA_LINEAR)
    assert report["adapter_tensors"] == 2 * 7 * 32
    assert report["adapter_dtypes"] == ["float32"]
    # the tensors' bytes, plus a header of 8 + roughly 150 bytes per tensor
    data = 39_976_960 * 4
    assert data + 448 * 100 < report["adapter_bytes"] < data + 448 * 200


def test_plan_llama_7b_memory_estimate(runs):
    memory = json.loads(ok(runs["plan 7b"]))["memory"]
    assert (memory["dtype"], memory["batch_size"], memory["seq_len"]) == ("bf16", 1, 512)
    assert memory["base_weights_bytes"] == (6_778_392_576 - 39_976_960) * 2
    assert memory["adapter_weights_bytes"] == memory["gradients_bytes"] == 39_976_960 * 4
    assert memory["optimizer_bytes"] == 39_976_960 * 8
    # 32 layers x [s*(4h + 2q + 2kv + 3i) + n*s^2] x 2 bytes + final norm + fp32 logits
    s, h, i = 512, 4096, 11008
    per_layer = s * (4 * h + 2 * h + 2 * h + 3 * i) + 32 * s * s
    assert memory["activations_bytes"] == 32 * per_layer * 2 + 2 * s * h * 2 + s * 32000 * 4
    assert memory["total_bytes"] == sum(
        memory[k]
        for k in ("base_weights_bytes", "adapter_weights_bytes", "gradients_bytes", "optimizer_bytes",
                  "activations_bytes")
    )  # fmt: skip
    assert memory["formula"]["per_layer_elements"] == "b*s*(4h + 2q + 2kv + 3i) + b*n*s^2"
    assert memory["model_shape"]["key_value_heads"] == 32


def test_plan_scales_activations_with_batch_and_sequence(models):
    from peftkit.planning import plan_report

    small = plan_report(models["tiny-llama"], "lora", {"r": 2}, "fp32", 1, 16)["memory"]
    big = plan_report(models["tiny-llama"], "lora", {"r": 2}, "fp32", 3, 32)["memory"]
    half = plan_report(models["tiny-llama"], "lora", {"r": 2}, "fp16", 1, 16)["memory"]

    # tiny llama: h=32, i=64, 4 heads of 8, 2 key/value heads, 2 layers, vocabulary 128
    def activations(b, s, width):
        return (
            2 * (b * s * (4 * 32 + 2 * 32 + 2 * 16 + 3 * 64) + b * 4 * s * s) * width
            + 2 * b * s * 32 * width
            + b * s * 128 * 4
        )

    assert small["activations_bytes"] == activations(1, 16, 4)
    assert big["activations_bytes"] == activations(3, 32, 4)
    assert half["activations_bytes"] == activations(1, 16, 2)
    assert half["base_weights_bytes"] * 2 == small["base_weights_bytes"]
    assert half["adapter_weights_bytes"] == small["adapter_weights_bytes"]  # the adapter stays fp32


def test_plan_adapter_bytes_is_the_saved_file_size(models, tmp_path):
    from peftkit import LoraConfig, get_peft_model
    from peftkit.planning import plan_report

    options = {"r": 3, "target_modules": "all-linear", "lora_alpha": 6}
    report = plan_report(models["tiny-llama"], "lora", options)
    get_peft_model(tiny_llama(), LoraConfig(**options)).save_pretrained(tmp_path / "a")
    assert report["adapter_bytes"] == (tmp_path / "a" / "adapter_model.safetensors").stat().st_size
    assert report["trainable_params"] == 2 * 3 * (  # two layers, rank 3: r * (in + out) per linear layer
        (32 + 32) + (32 + 16) + (32 + 16) + (32 + 32) + (32 + 64) * 2 + (64 + 32)
    )


def test_safetensors_size_with_mixed_dtypes(tmp_path):
    import torch
    from safetensors.torch import save_file

    tensors = {
        "b.weight": torch.zeros(3, 5, dtype=torch.bfloat16),
        "a.weight": torch.zeros(7, dtype=torch.float16),
        "c": torch.zeros(2, 2, dtype=torch.float64),
        "d": torch.zeros(1000, dtype=torch.float32),
        "e": torch.zeros(1, dtype=torch.int8),
    }
    metadata = {"format": "pt", "peftkit.version": "0.2.0"}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata=metadata)
    meta = {key: t.to("meta") for key, t in tensors.items()}
    assert safetensors_size(meta, metadata) == (tmp_path / "x.safetensors").stat().st_size


def test_plan_table(models):
    result = invoke("plan", str(models["tiny-llama"]), "-m", "lora", "-o", "r=2", "--dtype", "fp16",
                    "--batch-size", "4", "--seq-len", "64")  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"model:     LlamaForCausalLM (llama) from {models['tiny-llama']}"
    assert lines[1] == "method:    lora: LoraConfig(r=2)"
    assert lines[2] == "adapted:   4 modules (q_proj, v_proj)"  # LoRA's default targets for llama
    assert lines[3].startswith("trainable: 448 parameters (")  # 2 layers x 2 x ((32 + 32) + (32 + 16))
    assert "Training memory estimate (fp16 base, batch size 4, sequence length 64, AdamW):" in lines
    assert re.search(r"^  AdamW states\s+3,584\s+3.5 KiB$", result.stdout, re.M)


def test_plan_gpt2_conv1d(models):
    from peftkit.planning import plan_report

    report = plan_report(models["tiny-gpt2"], "lora", {"r": 2})
    assert report["model_class"] == "GPT2LMHeadModel"
    assert report["adapted_names"] == ["c_attn"]
    assert report["trainable_params"] == 2 * 2 * (32 + 96)  # 2 layers, rank 2, c_attn 32->96
    assert report["memory"]["model_shape"]["intermediate_size"] == 4 * 32  # n_inner unset: 4 x n_embd


# --- peftkit targets ---------------------------------------------------------------------------------
def test_targets_groups_json(models):
    result = invoke("targets", str(models["tiny-llama"] / "config.json"), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model_class"] == "LlamaForCausalLM"
    assert "method" not in report
    groups = {g["pattern"]: g for g in report["groups"]}
    assert groups["model.layers.*.self_attn.q_proj"] == {
        "pattern": "model.layers.*.self_attn.q_proj",
        "name": "q_proj",
        "type": "Linear",
        "kind": "linear",
        "count": 2,
        "targeted": None,
        "in_features": 32,
        "out_features": 32,
    }
    assert groups["model.layers.*.self_attn.k_proj"]["out_features"] == 16  # 2 key/value heads of 8
    assert groups["model.embed_tokens"]["kind"] == "embedding"
    assert groups["lm_head"]["count"] == 1
    assert report["targetable"] == 2 * 7 + 2


def test_targets_with_method_json(runs):
    report = json.loads(ok(runs["targets tiny lora"]))
    method = report["method"]
    assert method["name"] == "lora"
    assert method["matched"] == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert method["matched_count"] == 2
    assert method["config"]["layers_to_transform"] == [1]
    targeted = {g["name"]: g["targeted"] for g in report["groups"]}
    assert targeted == {
        "embed_tokens": 0,
        **{n: 0 for n in TINY_LLAMA_LINEAR},
        "q_proj": 1,
        "v_proj": 1,
        "lm_head": 0,
    }


def test_targets_table_all_linear(models):
    result = invoke(
        "targets", str(models["tiny-llama"]), "--method", "lora", "--option", "target_modules=all-linear"
    )
    assert result.exit_code == 0, result.output
    assert re.search(r"^model\.layers\.\*\.mlp\.down_proj\s+down_proj\s+Linear\s+linear\s+64->32\s+2\s+2$",
                     result.stdout, re.M)  # fmt: skip
    assert re.search(r"^lm_head\s+lm_head\s+Linear\s+linear\s+32->128\s+1\s+0$", result.stdout, re.M)
    assert result.stdout.splitlines()[-1] == (
        "LoraConfig(target_modules='all-linear') matches 14 of them "
        "(target_modules: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj)."
    )


def test_targets_default_targets_of_the_method(models):
    report = json.loads(invoke("targets", str(models["tiny-llama"]), "-m", "lora", "--json").stdout)
    assert report["method"]["target_modules"] == ["q_proj", "v_proj"]
    assert report["method"]["matched_count"] == 4


def test_targets_gpt2_conv1d(models):
    report = json.loads(invoke("targets", str(models["tiny-gpt2"]), "--json").stdout)
    groups = {g["name"]: g for g in report["groups"]}
    assert (groups["c_attn"]["type"], groups["c_attn"]["kind"]) == ("Conv1D", "linear")
    assert (groups["c_attn"]["in_features"], groups["c_attn"]["out_features"]) == (32, 96)
    assert groups["c_attn"]["pattern"] == "transformer.h.*.attn.c_attn"


def test_group_pattern():
    assert group_pattern("model.layers.12.self_attn.q_proj") == "model.layers.*.self_attn.q_proj"
    assert (
        group_pattern("encoder.block.0.layer.1.DenseReluDense.wi")
        == "encoder.block.*.layer.*.DenseReluDense.wi"
    )
    assert group_pattern("lm_head") == "lm_head"
    assert group_pattern("h2o.proj") == "h2o.proj"


def test_parse_options():
    assert parse_options(
        [
            "r=16",
            "target_modules=all-linear",
            'target_modules2=["q", "v"]',
            "use_dora=true",
            "lora_dropout=0.1",
            "x=a=b",
            "empty=",
        ]
    ) == {
        "r": 16,
        "target_modules": "all-linear",
        "target_modules2": ["q", "v"],
        "use_dora": True,
        "lora_dropout": 0.1,
        "x": "a=b",
        "empty": "",
    }


# --- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["targets", "plan"])
def test_missing_folder(command, models):
    assert error(invoke(command, str(models["tiny-llama"] / "nope"), "--method", "lora")) == (
        f"Error: model folder {str(models['tiny-llama'] / 'nope')!r} does not exist"
    )


@pytest.mark.parametrize("command", ["targets", "plan"])
def test_folder_without_config(command, tmp_path):
    assert error(invoke(command, str(tmp_path), "-m", "lora")) == (
        f"Error: {str(tmp_path)!r} has no config.json: it is not a transformers model folder"
    )


def test_config_that_is_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{model_type: llama")
    message = error(invoke("targets", str(tmp_path)))
    assert message.startswith(f"Error: {str(tmp_path / 'config.json')!r} is not valid JSON: ")


def test_config_without_model_type(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    assert error(invoke("targets", str(tmp_path))) == (
        f"Error: {str(tmp_path / 'config.json')!r} has no 'model_type': it is not a transformers model config"
    )


@pytest.mark.parametrize("command", ["targets", "plan"])
def test_unknown_method(command, models):
    message = error(invoke(command, str(models["tiny-llama"]), "--method", "lorax"))
    assert message.startswith("Error: no installed plugin provides the method 'lorax'; installed methods: ")
    assert "lora (LORA)" in message


@pytest.mark.parametrize("command", ["targets", "plan"])
def test_unknown_option(command, models):
    message = error(invoke(command, str(models["tiny-llama"]), "-m", "lora", "-o", "lora_alpah=4"))
    assert message.startswith(
        "Error: LoraConfig has no field 'lora_alpah' (did you mean 'lora_alpha' or 'lora_bias'?); its fields: "
    )
    assert message.endswith(", use_dora, use_rslora")
    message = error(invoke(command, str(models["tiny-llama"]), "-m", "lora", "-o", "rank=4"))
    assert message.startswith(
        "Error: LoraConfig has no field 'rank'; its fields: alpha_pattern, auto_mapping, "
    )


@pytest.mark.parametrize("command", ["targets", "plan"])
def test_bad_option_value(command, models):
    assert error(invoke(command, str(models["tiny-llama"]), "-m", "lora", "-o", "r=0")) == (
        "Error: LoraConfig.r must be an integer >= 1, got 0"
    )


def test_option_without_equals(models):
    assert error(invoke("plan", str(models["tiny-llama"]), "-m", "lora", "-o", "r16")) == (
        "Error: option 'r16' must be written key=value (e.g. r=16)"
    )


def test_option_without_method(models):
    assert error(invoke("targets", str(models["tiny-llama"]), "-o", "r=4")) == (
        "Error: --option needs --method: options are fields of a method's config"
    )


def test_targets_that_match_nothing(models):
    message = error(
        invoke("targets", str(models["tiny-llama"]), "-m", "lora", "-o", 'target_modules=["qq_proj"]')
    )
    assert message.startswith(
        "Error: LoraConfig.target_modules=['qq_proj'] matched no module of LlamaForCausalLM."
    )
    assert "did you mean 'q_proj'" in message


def test_targets_of_a_method_without_target_modules(models):
    assert error(invoke("targets", str(models["tiny-llama"]), "-m", "prompt_tuning")) == (
        "Error: method 'prompt_tuning' (PromptTuningConfig) does not target modules: it has no target_modules"
    )


def test_plan_bad_dtype(models):
    result = invoke("plan", str(models["tiny-llama"]), "-m", "lora", "--dtype", "int3")
    assert result.exit_code == 2
    assert "Invalid value for '--dtype': 'int3' is not one of" in result.stderr


def test_plan_model_file_that_is_not_a_config(tmp_path):
    shutil.copy(__file__, tmp_path / "model.py")
    message = error(invoke("plan", str(tmp_path / "model.py"), "-m", "lora"))
    assert message.startswith(f"Error: {str(tmp_path / 'model.py')!r} is not valid JSON: ")
