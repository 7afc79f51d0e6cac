"""``peftkit merge BASE ADAPTER OUT``: a merged, plain transformers model folder, written atomically.

The end-to-end run is a subprocess; the merged folder is loaded back with transformers alone and its
logits compared with the unmerged adapter's. Error messages run in-process with click's runner.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.cli import make_cli
from peftkit.merge_folder import (
    BNB_KERNEL_NOTICE,
    BNB_KERNEL_NOTICE_LOGGER,
    is_quantized,
    merge_kwargs,
    without_bitsandbytes_kernel_notice,
)
from peftkit.testing.models import randomize_trainable, tiny_llama
from transformers import AutoModelForCausalLM

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 127, 3]])


def _tokenizer_files(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge")
    tiny_llama(seed=1).save_pretrained(root / "base")
    _tokenizer_files(root / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    randomize_trainable(get_peft_model(tiny_llama(seed=1), config), seed=3).save_pretrained(root / "adapter")
    (root / "taken").mkdir()
    (root / "taken" / "old.txt").write_text("old content")
    return {name: root / name for name in ("base", "adapter", "taken")} | {"root": root}


@pytest.fixture(scope="module")
def merged(folders) -> dict[str, subprocess.CompletedProcess]:
    def start(*args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "peftkit", "merge", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )

    root = folders["root"]
    started = {
        "plain": start(folders["base"], folders["adapter"], root / "out" / "merged"),
        "overwrite": start(folders["base"], folders["adapter"], folders["taken"], "--overwrite", "--json",
                           "--dtype", "bf16"),
    }  # fmt: skip
    done = {}
    for name, process in started.items():
        stdout, stderr = process.communicate(timeout=300)
        done[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return done


def _unmerged_logits(folders) -> torch.Tensor:
    base = AutoModelForCausalLM.from_pretrained(folders["base"], local_files_only=True)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, folders["adapter"]).eval()(IDS).logits


def test_merged_folder_loads_without_peftkit_and_matches_the_adapter(merged, folders):
    run = merged["plain"]
    assert run.returncode == 0, run.stderr
    out = folders["root"] / "out" / "merged"
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not any("lora" in name for name, _ in model.named_parameters())
    with torch.no_grad():
        logits = model(IDS).logits
    expected = _unmerged_logits(folders)
    base = AutoModelForCausalLM.from_pretrained(folders["base"], local_files_only=True).eval()
    with torch.no_grad():
        assert (base(IDS).logits - expected).abs().max() > 1e-3  # the adapter does change the outputs
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_merged_folder_files(merged, folders):
    out = folders["root"] / "out" / "merged"
    names = sorted(path.name for path in out.iterdir())
    assert "model.safetensors" in names and "config.json" in names
    assert not [name for name in names if name.startswith("adapter_")]
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the base's tokenizer, byte for byte
        assert (out / name).read_bytes() == (folders["base"] / name).read_bytes()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    # nothing left beside OUT: the temporary folder was renamed into place
    assert sorted(path.name for path in out.parent.iterdir()) == ["merged"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    lines = merged["plain"].stdout.splitlines()
    assert lines[0] == (
        f"Merged LORA adapter {folders['adapter']} into LlamaForCausalLM from {folders['base']} (float32)."
    )
    assert lines[1].startswith(f"Wrote {out}: ")
    assert "  model.safetensors" in lines


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_overwrite_replaces_the_folder_and_converts_dtype(merged, folders):
    run = merged["overwrite"]
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    out = folders["taken"]
    assert report["out"] == str(out)
    assert (report["method"], report["peft_type"], report["dtype"]) == ("lora", "LORA", "bfloat16")
    assert report["dequantized"] is False
    # what the base's tokenizer saved: transformers 4 writes a special_tokens_map.json as well
    saved = sorted(p.name for p in folders["base"].iterdir() if p.name.startswith(("tokenizer", "special_")))
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(saved)
    assert sorted(report["tokenizer_files"]) == saved
    assert report["files"] == sorted(path.name for path in out.iterdir())
    assert not (out / "old.txt").exists()  # replaced, not merged with the old content
    assert report["bytes"] == sum(path.stat().st_size for path in out.iterdir())
    # dtype="auto": the saved dtype (transformers 5's default; transformers 4 loads float32 by default)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # no backup left behind


# --- quantized bases ---------------------------------------------------------------------------------
def test_quantized_base_is_merged_with_dequantize():
    assert merge_kwargs(quantized=True) == {"dequantize": True}
    assert merge_kwargs(quantized=False) == {}


def test_the_cores_merge_and_unload_dequantizes_into_the_dtype_asked_for():
    assert merge_kwargs(quantized=True, dtype="bf16") == {"dequantize": True, "dtype": torch.bfloat16}
    assert merge_kwargs(quantized=True) == {"dequantize": True}


def test_bitsandbytes_kernel_notice_is_dropped_while_loading_and_nothing_else():
    """The one bitsandbytes message peftkit drops (the end-to-end check, with bitsandbytes, is peftkit-bnb's)."""
    logger = logging.getLogger(BNB_KERNEL_NOTICE_LOGGER)
    # other tests quiet the "bitsandbytes" logger (level ERROR); this one needs its warnings, in any order
    level = logger.level
    logger.setLevel(logging.WARNING)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    notice = (
        f"{BNB_KERNEL_NOTICE}: No module named 'kernels'. Please make sure you already `pip install kernels`"
    )
    try:
        with without_bitsandbytes_kernel_notice():
            logger.warning("%s: %s", BNB_KERNEL_NOTICE, "No module named 'kernels'")
            logger.warning("4-bit weights on an unsupported device")
        logger.warning(notice)  # outside the block: shown again
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert seen == ["4-bit weights on an unsupported device", notice]


def test_is_quantized():
    model = tiny_llama()
    assert not is_quantized(model)
    model.config.quantization_config = {"load_in_4bit": True}
    assert is_quantized(model)


# --- bad input -------------------------------------------------------------------------------------
def invoke(*args: object):
    return CliRunner().invoke(make_cli(), ["merge", *map(str, args)], prog_name="peftkit")


def error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.stderr.strip().splitlines()[-1]


def test_existing_out_is_an_error(folders):
    assert error(invoke(folders["base"], folders["adapter"], folders["taken"])) == (
        f"Error: output folder {str(folders['taken'])!r} already exists; pass --overwrite to replace it"
    )


def test_out_that_is_a_file(folders, tmp_path):
    (tmp_path / "file").write_text("x")
    assert error(invoke(folders["base"], folders["adapter"], tmp_path / "file", "--overwrite")) == (
        f"Error: output {str(tmp_path / 'file')!r} is a file, not a folder"
    )


def test_missing_base(folders, tmp_path):
    assert error(invoke(tmp_path / "nope", folders["adapter"], tmp_path / "out")) == (
        f"Error: model folder {str(tmp_path / 'nope')!r} does not exist"
    )
    assert not (tmp_path / "out").exists()


def test_base_without_config(folders, tmp_path):
    assert error(invoke(tmp_path, folders["adapter"], tmp_path / "out")) == (
        f"Error: {str(tmp_path)!r} has no config.json: it is not a transformers model folder"
    )


def test_missing_adapter(folders, tmp_path):
    assert error(invoke(folders["base"], tmp_path / "nope", tmp_path / "out")) == (
        f"Error: adapter folder {str(tmp_path / 'nope')!r} does not exist"
    )


def test_adapter_folder_without_adapter_config(folders):
    assert error(invoke(folders["base"], folders["base"], folders["root"] / "never")) == (
        f"Error: {str(folders['base'])!r} has no adapter_config.json: it is not an adapter folder"
    )


def test_adapter_of_an_uninstalled_method(folders, tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "NO_SUCH_METHOD", "r": 4}')
    message = error(invoke(folders["base"], tmp_path, tmp_path / "out"))
    assert message.startswith(
        "Error: no installed plugin provides peft_type 'NO_SUCH_METHOD' (install 'peftkit-no-such-method'"
    )


def test_adapter_of_a_method_that_cannot_merge(folders, tmp_path):
    (tmp_path / "adapter_config.json").write_text(
        '{"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4}'
    )
    assert error(invoke(folders["base"], tmp_path, tmp_path / "out")) == (
        "Error: method 'prompt_tuning' cannot merge its adapters into the base weights"
    )
