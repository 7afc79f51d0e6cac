"""Merging an adapter folder into its base model folder, written as a plain transformers model folder.

``peftkit merge BASE ADAPTER OUT`` calls :func:`merge_to_folder`: load the base (offline), load the adapter
onto it, ``merge_and_unload()``, and save the result with safetensors, plus the base's tokenizer files.
OUT appears whole or not at all: it is written with :func:`peftkit.serialization.atomic_folder`.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from peftkit import plugins
from peftkit.config import read_config_dict
from peftkit.errors import MergeNotSupportedError, PeftkitError
from peftkit.model import PeftModel
from peftkit.planning import config_path, model_class, read_model_config
from peftkit.serialization import atomic_folder, load_config

# files of a tokenizer (and its chat template) that a model folder may hold beside the weights
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

# bitsandbytes logs this when it is imported on a CPU with AVX512-BF16 and the optional `kernels` package is
# missing: advice about a speed-up of its own, not about the merge asked for. Loading a quantized base is
# where peftkit makes bitsandbytes load, so that is where it is dropped, and nothing else.
BNB_KERNEL_NOTICE_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class MergeTargetError(PeftkitError, ValueError):
    """An OUT folder that exists (without --overwrite), or is a file."""


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise MergeTargetError(f"output {str(out)!r} is a file, not a folder")
    if out.exists() and not overwrite:
        raise MergeTargetError(f"output folder {str(out)!r} already exists; pass --overwrite to replace it")


def is_quantized(model: Any) -> bool:
    """A base loaded with quantized weights (bitsandbytes and the like)."""
    return bool(getattr(model, "is_quantized", False)) or (
        getattr(getattr(model, "config", None), "quantization_config", None) is not None
    )


def merge_kwargs(quantized: bool, dtype: str | None = None) -> dict[str, Any]:
    """``dequantize=True`` (and the dtype asked for) for a quantized base: it merges into full precision."""
    if not quantized:
        return {}
    kwargs: dict[str, Any] = {"dequantize": True}
    if dtype:
        import torch

        kwargs["dtype"] = getattr(torch, TORCH_DTYPES[dtype])
    return kwargs


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextlib.contextmanager
def without_bitsandbytes_kernel_notice() -> Iterator[None]:
    """Within the block, bitsandbytes' notice about its optional CPU kernel is dropped; its other logs stay."""
    logger = logging.getLogger(BNB_KERNEL_NOTICE_LOGGER)
    drop = _DropMessage(BNB_KERNEL_NOTICE)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def load_base(base: Path, dtype: str | None) -> Any:
    """The base model from its folder, offline, at ``dtype`` (fp32/fp16/bf16) or as saved."""
    config = read_model_config(base)
    cls = model_class(config)
    torch_dtype = TORCH_DTYPES[dtype] if dtype else "auto"
    with without_bitsandbytes_kernel_notice():  # a quantized base imports bitsandbytes here
        return cls.from_pretrained(str(base), local_files_only=True, dtype=torch_dtype)


@contextlib.contextmanager
def transformers_progress_bars(enabled: bool) -> Iterator[None]:
    """Let transformers draw its own progress bars (loading, writing shards) only when ours are shown."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    (logging.enable_progress_bar if enabled else logging.disable_progress_bar)()
    try:
        yield
    finally:
        (logging.enable_progress_bar if was_enabled else logging.disable_progress_bar)()


def copy_tokenizer_files(base: Path, out: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, out / name)
            copied.append(name)
    return copied


def merge_to_folder(
    base: str | Path,
    adapter: str | Path,
    out: str | Path,
    dtype: str | None = None,
    overwrite: bool = False,
    progressbar: bool = False,
    status: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Merge ``adapter`` into ``base`` and write the merged model to ``out``; return what was done."""
    base, adapter, out = Path(base), Path(adapter), Path(out)
    check_out(out, overwrite)
    config_path(base)  # a clear error for a missing base folder before anything is loaded
    read_config_dict(adapter)
    peft_config = load_config(adapter)
    spec = plugins.method_for_config(peft_config)
    if not spec.mergeable:
        raise MergeNotSupportedError(f"method {spec.name!r} cannot merge its adapters into the base weights")

    with transformers_progress_bars(progressbar):
        status(f"Loading base model from {base}")
        model = load_base(base, dtype)
        quantized = is_quantized(model)
        status(f"Loading adapter from {adapter} ({spec.peft_type})")
        peft_model = PeftModel.from_pretrained(model, adapter)
        kwargs = merge_kwargs(quantized, dtype)
        status("Merging")
        # with dequantize=True the core also drops the model's quantization config, so OUT saves plain
        merged = peft_model.merge_and_unload(progressbar=progressbar, **kwargs)

        status(f"Writing {out}")
        with atomic_folder(out, keep_old_entries=False) as staging:
            merged.save_pretrained(str(staging), safe_serialization=True)
            tokenizer_files = copy_tokenizer_files(base, staging)
            files = sorted(path.name for path in staging.iterdir())
    return {
        "base": str(base),
        "adapter": str(adapter),
        "out": str(out),
        "method": spec.name,
        "peft_type": spec.peft_type,
        "model_class": type(merged).__name__,
        "dtype": str(next(merged.parameters()).dtype).removeprefix("torch."),
        "dequantized": quantized,
        "files": files,
        "tokenizer_files": tokenizer_files,
        "bytes": sum((out / name).stat().st_size for name in files if (out / name).is_file()),
    }
