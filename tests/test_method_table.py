"""docs/methods/index.md's table of methods against the installed plugins, column by column."""

from __future__ import annotations

import functools
import importlib.util
import logging
import re
from pathlib import Path

import peft
import pytest
import torch
from peftkit import get_peft_model, plugins, prepare_model_for_kbit_training
from peftkit.mixed_batch import ROW_WISE_FAMILIES
from peftkit.testing import ConformanceSuite
from peftkit.testing.models import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "methods" / "index.md"
COLUMNS = ("method", "package", "peft", "merges", "quantized", "mixed", "compile")

# a small config per method for the quantized training step; a new method needs one here
TARGETS = ["q_proj", "v_proj", "down_proj"]
VIRTUAL_TOKENS = dict(task_type="CAUSAL_LM", num_virtual_tokens=4)
EXAMPLE_CONFIGS = {
    "lora": ("LoraConfig", dict(r=4, target_modules=TARGETS)),
    "loha": ("LoHaConfig", dict(r=4, target_modules=TARGETS)),
    "lokr": ("LoKrConfig", dict(r=4, target_modules=TARGETS)),
    "adalora": ("AdaLoraConfig", dict(target_modules=TARGETS, init_r=4, target_r=2, total_step=10)),
    "vera": ("VeraConfig", dict(r=4, target_modules=TARGETS)),
    "oft": ("OFTConfig", dict(oft_block_size=16, target_modules=TARGETS)),
    "boft": ("BOFTConfig", dict(boft_block_size=8, boft_n_butterfly_factor=2, target_modules=TARGETS)),
    "ia3": ("IA3Config", dict(target_modules=TARGETS, feedforward_modules=["down_proj"])),
    "bitfit": ("BitFitConfig", {}),
    "ln_tuning": ("LNTuningConfig", {}),
    "trainable_tokens": ("TrainableTokensConfig", dict(token_indices=[1, 2, 3])),
    "bottleneck": ("BottleneckConfig", {}),
    "prompt_tuning": ("PromptTuningConfig", VIRTUAL_TOKENS),
    "prefix_tuning": ("PrefixTuningConfig", VIRTUAL_TOKENS),
    "p_tuning": ("PromptEncoderConfig", dict(VIRTUAL_TOKENS, encoder_hidden_size=16)),
}
# Methods that run on adapters of another method: an AdapterFusion over bottleneck adapters. The kit's suites
# and the quantized step add one adapter to a bare model, which such a method cannot be; each has a setup here
# that adds what it needs and activates it.
def _fusion_over_two_bottleneck_adapters(base):
    from peftkit import Fuse

    model = get_peft_model(base, plugins.config_class_named("BottleneckConfig")(), "a")
    model.add_adapter("b", plugins.config_class_named("BottleneckConfig")())
    model.add_adapter_fusion(["a", "b"])
    model.set_adapter(Fuse("a", "b"))
    return model


COMPANION_SETUPS = {"adapter_fusion": _fusion_over_two_bottleneck_adapters}
QUANTIZATION = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}


def table() -> dict[str, dict[str, str]]:
    """The page's rows by method name (the first column's code span)."""
    rows = {}
    for line in PAGE.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        name = re.match(r"`(\w+)`", cells[0]) if len(cells) == len(COLUMNS) else None
        if name:
            rows[name.group(1)] = dict(zip(COLUMNS, cells))
    return rows


def yes_no(value: bool) -> str:
    return "yes" if value else "no"


@functools.cache
def conformance_suites() -> dict[str, type[ConformanceSuite]]:
    """Each method's conformance suite, from the checkout's plugin and example-plugin test folders."""
    suites = {}
    paths = [
        *ROOT.glob("plugins/*/tests/test_conformance.py"),
        *ROOT.glob("examples/third_party/*/tests/test_conformance.py"),
    ]
    for index, path in enumerate(sorted(paths)):
        spec = importlib.util.spec_from_file_location(f"_method_table_conformance_{index}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, ConformanceSuite)
                and value is not ConformanceSuite
            ):
                suites[value.method] = value
    return suites


def test_the_table_has_a_row_for_every_installed_method_and_no_other():
    assert sorted(table()) == sorted(plugins.methods())


@pytest.mark.parametrize("name", sorted(plugins.methods()))
def test_each_row_says_what_the_method_registers(name):
    spec, row = plugins.methods()[name], table()[name]
    assert row["package"] == spec.distribution
    in_peft = spec.peft_type in peft.PeftType.__members__
    assert row["peft"] == (f"`{spec.peft_type}`" if in_peft else "none")
    assert row["merges"] == yes_no(spec.mergeable)
    assert row["mixed"] == yes_no(spec.family in ROW_WISE_FAMILIES)


@pytest.mark.parametrize("name", sorted(plugins.methods()))
def test_the_compile_column_matches_the_conformance_suites(name):
    if name in COMPANION_SETUPS:  # no suite of its own: compiled here in one graph, against eager
        model = COMPANION_SETUPS[name](tiny_llama()).eval()
        ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            eager = model(input_ids=ids).logits
            compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(input_ids=ids).logits
        torch.testing.assert_close(compiled, eager)
        assert table()[name]["compile"] == "yes"
        return
    suites = conformance_suites()
    assert name in suites, f"method {name!r} has no conformance suite in a tests/test_conformance.py"
    runs_compiles = suites[name].test_compiles is ConformanceSuite.test_compiles
    assert table()[name]["compile"] == yes_no(runs_compiles)


@pytest.fixture(scope="module")
def quantized_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama-with-biases")
    # biases, so that BitFit has something to train; hidden size 64: bitsandbytes quantizes blocks of 64
    tiny_llama(hidden_size=64, attention_bias=True, mlp_bias=True).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", sorted(QUANTIZATION))
@pytest.mark.parametrize("name", sorted(plugins.methods()))
def test_the_quantized_column_matches_a_training_step(name, kind, quantized_folder):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    assert name in EXAMPLE_CONFIGS or name in COMPANION_SETUPS, (
        f"add an example config for method {name!r} to EXAMPLE_CONFIGS"
    )
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    base = AutoModelForCausalLM.from_pretrained(
        quantized_folder,
        quantization_config=BitsAndBytesConfig(**QUANTIZATION[kind]),
        device_map="cpu",
        dtype=torch.float32,
    )
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    if name in COMPANION_SETUPS:
        model = COMPANION_SETUPS[name](base)
    else:
        class_name, kwargs = EXAMPLE_CONFIGS[name]
        model = get_peft_model(base, plugins.config_class_named(class_name)(**kwargs))
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    model.train()(input_ids=ids, labels=ids).loss.backward()
    trainable = [param for param in model.parameters() if param.requires_grad]
    trains = bool(trainable) and all(param.grad is not None for param in trainable)
    assert table()[name]["quantized"] == yes_no(trains)
