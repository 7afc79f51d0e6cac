"""peftkit-lora against AdapterHub's adapters 1.3 itself: a LoRAConfig adapter saved by save_adapter loads as a
peftkit LoRA adapter with AdapterHub's outputs, one saved with save_pretrained(format="adapterhub") loads in
AdapterHub with peftkit's outputs, what LoRA cannot compute is refused by name, and `peftkit inspect` shows
such a folder.

Needs adapters 1.3, which needs transformers 4.57: the transformers 4 stage runs this file, the first stage
leaves it out (dev.sh's ADAPTERHUB_TESTS).
"""

from __future__ import annotations

import json
import re

import adapters
import pytest
import torch
from adapters import DoRAConfig, IA3Config, LoRAConfig, VeraConfig
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from peftkit import AdapterLoadError, ConfigError, LoraConfig, PeftModel, get_peft_model
from peftkit.cli import make_cli
from peftkit.testing.models import randomize_trainable, tiny_bert, tiny_gpt2, tiny_llama

IDS = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(0))
TOLERANCE = 1e-5  # relative to the largest output


def tiny_roberta(seed: int = 0):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=140,
        pad_token_id=0,
    )
    return RobertaForSequenceClassification(config).eval()


def tiny_mistral(seed: int = 0):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    return MistralForCausalLM(config).eval()


BUILDERS = {"bert": tiny_bert, "roberta": tiny_roberta, "llama": tiny_llama, "mistral": tiny_mistral}


def twin(model):
    """A second model with the same weights, built as the first and given its state."""
    other = type(model)(model.config).eval()
    other.load_state_dict(model.state_dict())
    return other


def outputs(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def relative_difference(ours, theirs):
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def adapterhub_model(base, config, name="task"):
    """``base`` with AdapterHub's adapter ``name`` of ``config``, its weights random (B is zero at AdapterHub's
    init), active."""
    adapters.init(base)
    base.add_adapter(name, config=config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter_name, parameter in base.named_parameters():
            if f".loras.{name}." in parameter_name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    base.set_active_adapters(name)
    return base.eval()


def saved_by_adapterhub(folder, config, build=tiny_bert):
    base = build()
    reference = adapterhub_model(twin(base), config)
    reference.save_adapter(str(folder), "task")
    return base, reference


# --- AdapterHub → peftkit ------------------------------------------------------------------------------------
CONFIGS = {
    "defaults": {},
    "all-places": dict(r=3, alpha=5, attn_matrices=["q", "k", "v"], intermediate_lora=True, output_lora=True),
    "feed-forward-leave-out": dict(
        r=2, alpha=16, selfattn_lora=False, intermediate_lora=True, output_lora=True, leave_out=[0]
    ),
    "dropout-kv": dict(r=4, alpha=8, attn_matrices=["k", "v"], dropout=0.1, leave_out=[1]),
}
CASES = [(model_type, config) for model_type in BUILDERS for config in CONFIGS]


@pytest.mark.parametrize(("model_type", "config"), CASES, ids=[f"{m}-{c}" for m, c in CASES])
def test_an_adapterhub_lora_folder_loads_with_adapterhubs_outputs(model_type, config, tmp_path):
    base, reference_model = saved_by_adapterhub(tmp_path, LoRAConfig(**CONFIGS[config]), BUILDERS[model_type])
    plain = outputs(base)

    model = PeftModel.from_pretrained(base, tmp_path)

    loaded = model.peft_config["default"]
    source = LoRAConfig(**CONFIGS[config])
    assert (loaded.r, loaded.lora_alpha, loaded.lora_dropout) == (source.r, source.alpha, source.dropout)
    reference = outputs(reference_model)
    assert relative_difference(plain, reference) > 0.01, "the adapter should change the outputs"
    assert relative_difference(outputs(model), reference) < TOLERANCE


def test_each_place_maps_to_the_module_adapterhub_wraps(tmp_path):
    """AdapterHub's Llama puts intermediate_lora on down_proj and output_lora on up_proj; BERT's output_lora is
    the feed-forward output (output.dense), not the attention's (attention.output.dense)."""
    expected = {
        "bert": {"attention.self.key", "intermediate.dense", "output.dense"},
        "llama": {"self_attn.k_proj", "mlp.down_proj", "mlp.up_proj"},
    }
    for model_type, inner in expected.items():
        folder = tmp_path / model_type
        base, _ = saved_by_adapterhub(
            folder,
            LoRAConfig(attn_matrices=["k"], intermediate_lora=True, output_lora=True),
            BUILDERS[model_type],
        )
        model = PeftModel.from_pretrained(base, folder)
        adapted = {re.sub(r"^.*?\.layers?\.\d\.", "", path) for path, _ in model.adapter_layers()}
        assert adapted == inner, model_type


@settings(max_examples=12, deadline=None)
@given(
    model_type=st.sampled_from(["bert", "llama"]),
    r=st.integers(1, 5),
    alpha=st.integers(1, 32),
    attn_matrices=st.lists(st.sampled_from(["q", "k", "v"]), unique=True, max_size=3),
    intermediate=st.booleans(),
    output=st.booleans(),
    leave_out=st.sampled_from([[], [0], [1]]),
)
def test_any_lora_config_loads_with_adapterhubs_outputs(
    tmp_path_factory, model_type, r, alpha, attn_matrices, intermediate, output, leave_out
):
    if not (attn_matrices or intermediate or output):
        attn_matrices = ["v"]
    config = LoRAConfig(
        r=r,
        alpha=alpha,
        attn_matrices=attn_matrices,
        selfattn_lora=bool(attn_matrices),
        intermediate_lora=intermediate,
        output_lora=output,
        leave_out=leave_out,
    )
    folder = tmp_path_factory.mktemp("hub")
    base, reference_model = saved_by_adapterhub(folder, config, BUILDERS[model_type])
    model = PeftModel.from_pretrained(base, folder)
    assert relative_difference(outputs(model), outputs(reference_model)) < TOLERANCE


def test_load_adapter_adds_an_adapterhub_lora_beside_other_adapters(tmp_path):
    base, reference_model = saved_by_adapterhub(
        tmp_path, LoRAConfig(attn_matrices=["q", "v"], output_lora=True), tiny_llama
    )
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj", "o_proj"]))
    randomize_trainable(model, scale=0.3)
    model.load_adapter(tmp_path, "hub")
    model.set_adapter("hub")
    assert relative_difference(outputs(model), outputs(reference_model)) < TOLERANCE
    # without a name, the adapter takes the one AdapterHub saved it under
    assert model.load_adapter(tmp_path) == "task"
    model.set_adapter("task")
    assert relative_difference(outputs(model), outputs(reference_model)) < TOLERANCE


def test_an_adapter_saved_from_the_bare_encoder_loads_onto_a_classifier(tmp_path):
    base = tiny_bert()
    reference_model = adapterhub_model(twin(base).bert, LoRAConfig(intermediate_lora=True))
    reference_model.save_adapter(str(tmp_path), "task")
    model = PeftModel.from_pretrained(base, tmp_path)
    with torch.no_grad():
        ours = model.base_model.model.bert(input_ids=IDS).last_hidden_state
        theirs = reference_model(input_ids=IDS).last_hidden_state
    assert relative_difference(ours, theirs) < TOLERANCE


# --- peftkit → AdapterHub ------------------------------------------------------------------------------------
WRITE_CASES = [
    ("bert", LoraConfig(r=4, lora_alpha=7, target_modules=["query", "value"])),
    ("bert", LoraConfig(r=2, target_modules=["key", "intermediate.dense"], layers_to_transform=[1])),
    (
        "llama",
        LoraConfig(
            r=3,
            lora_alpha=6,
            lora_dropout=0.05,
            target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
        ),
    ),
    ("mistral", LoraConfig(r=2, target_modules=["down_proj"], layers_to_transform=[0])),
]


@pytest.mark.parametrize(
    ("model_type", "config"), WRITE_CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(WRITE_CASES)]
)
def test_a_peftkit_lora_saved_for_adapterhub_loads_there_with_the_same_outputs(model_type, config, tmp_path):
    base = BUILDERS[model_type]()
    theirs = twin(base)
    plain = outputs(base)
    model = get_peft_model(base, config)
    randomize_trainable(model, scale=0.3)
    model.save_pretrained(tmp_path, format="adapterhub")

    adapters.init(theirs)
    name = theirs.load_adapter(str(tmp_path), set_active=True)

    assert name == "default"
    ours = outputs(model)
    assert relative_difference(plain, ours) > 0.01, "the adapter should change the outputs"
    assert relative_difference(ours, outputs(theirs.eval())) < TOLERANCE
    # and back: peftkit reads its own AdapterHub folder to the same outputs
    again = PeftModel.from_pretrained(BUILDERS[model_type](), tmp_path)
    assert torch.equal(outputs(again), ours)


def test_the_written_config_is_adapterhubs_lora_config(tmp_path):
    model = get_peft_model(
        tiny_llama(),
        LoraConfig(r=2, lora_alpha=3, target_modules=["v_proj", "up_proj"], layers_to_transform=[1]),
    )
    model.save_pretrained(tmp_path, format="adapterhub")
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (data["name"], data["model_type"], data["model_class"]) == ("default", "llama", "LlamaForCausalLM")
    assert (
        data["config"]
        == LoRAConfig(r=2, alpha=3, attn_matrices=["v"], output_lora=True, leave_out=[0]).to_dict()
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "adapter.safetensors",
        "adapter_config.json",
        "pytorch_adapter.bin",
    ]


# --- what is refused, and why -------------------------------------------------------------------------------
def config_path(folder):
    return repr(str(folder / "adapter_config.json"))


@pytest.mark.parametrize(
    ("config", "option", "value", "why"),
    [
        (IA3Config(), "composition_mode", "scale", "'scale' is AdapterHub's (IA)^3"),
        (LoRAConfig(use_gating=True), "use_gating", True, "a learned gate"),
        (
            DoRAConfig(),
            "use_dora",
            True,
            "AdapterHub's DoRA normalises W + B A without the alpha / r scaling",
        ),
        (VeraConfig(), "vera_d", 0.1, "VeRA: frozen random A and B"),
    ],
    ids=["ia3", "gating", "dora", "vera"],
)
def test_an_adapterhub_option_lora_cannot_compute_is_refused_by_name(config, option, value, why, tmp_path):
    adapters_model = tiny_llama()
    adapters.init(adapters_model)
    adapters_model.add_adapter("task", config=config)
    adapters_model.save_adapter(str(tmp_path), "task")
    with pytest.raises(AdapterLoadError) as info:
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    message = str(info.value)
    assert message.startswith(
        f"{config_path(tmp_path)} sets the AdapterHub option {option}={value!r}, which peftkit-lora cannot "
        f"represent ({why}"
    )
    only = {"composition_mode": "'add'", "use_gating": "False", "use_dora": "False", "vera_d": "None"}[option]
    assert message.endswith(
        f"peftkit-lora reads {option}={only} only: load this adapter with AdapterHub's adapters library instead"
    )


def test_the_ia3_refusal_reads_in_full(tmp_path):
    saved_by_adapterhub(tmp_path, IA3Config())
    with pytest.raises(AdapterLoadError) as info:
        PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert str(info.value) == (
        f"{config_path(tmp_path)} sets the AdapterHub option composition_mode='scale', which peftkit-lora cannot "
        "represent ('scale' is AdapterHub's (IA)^3 (IA3Config): it multiplies the layer's output by a learned "
        "vector instead of adding scaling · B A x); peftkit-lora reads composition_mode='add' only: load this "
        "adapter with AdapterHub's adapters library instead"
    )


def edit_config(folder, **options):
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    data["config"].update(options)
    path.write_text(json.dumps(data))


def test_mtl_lora_and_unknown_attention_matrices_are_refused(tmp_path):
    saved_by_adapterhub(tmp_path, LoRAConfig())
    edit_config(tmp_path, attn_matrices=["q", "o"])
    with pytest.raises(
        AdapterLoadError, match=r"sets the AdapterHub option attn_matrices=\['q', 'o'\], which"
    ):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)
    edit_config(tmp_path, architecture="mtl_lora", attn_matrices=["q"])
    with pytest.raises(
        AdapterLoadError, match="option architecture='mtl_lora', which peftkit-lora cannot represent"
    ):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)


def test_a_model_type_without_a_known_layout_is_named(tmp_path):
    saved_by_adapterhub(tmp_path, LoRAConfig(), tiny_gpt2)
    with pytest.raises(AdapterLoadError) as info:
        PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    assert str(info.value) == (
        "peftkit-lora knows where AdapterHub's LoRA goes for model types bert, llama, mistral, roberta only; "
        "GPT2LMHeadModel is model_type 'gpt2': load this adapter with AdapterHub's adapters library instead"
    )


def test_an_adapter_for_another_model_is_refused(tmp_path):
    saved_by_adapterhub(tmp_path, LoRAConfig(), tiny_llama)
    with pytest.raises(
        AdapterLoadError, match="holds tensor 'model.layers.0.self_attn.q_proj.loras.task.lora_A'"
    ):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)
    saved_by_adapterhub(tmp_path, LoRAConfig(), tiny_bert)
    edit_config(tmp_path, output_lora=True)
    with pytest.raises(
        AdapterLoadError, match="has no 'lora_A' for layer 0's 'output.dense' \\(output_lora\\)"
    ):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)


class NotATensor:
    pass


def test_a_pickle_that_is_not_weights_only_is_refused(tmp_path):
    saved_by_adapterhub(tmp_path, LoRAConfig())
    torch.save({"payload": NotATensor()}, tmp_path / "pytorch_adapter.bin")
    with pytest.raises(AdapterLoadError) as info:
        PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert str(info.value).startswith(
        f"{str(tmp_path / 'pytorch_adapter.bin')!r} is not a weights-only torch file, so peftkit does not read it"
    )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            LoraConfig(target_modules=["q_proj"], use_dora=True),
            "sets LoraConfig.use_dora=True, which AdapterHub's LoRA cannot hold",
        ),
        (
            LoraConfig(target_modules=["q_proj"], use_rslora=True),
            r"sets LoraConfig.use_rslora=True, which AdapterHub's LoRA cannot hold \(AdapterHub scales by alpha / r\)",
        ),
        (LoraConfig(target_modules=["q_proj"], bias="all"), "sets LoraConfig.bias='all', which"),
        (
            LoraConfig(target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 4}),
            r"sets LoraConfig.rank_pattern=\{'v_proj': 4\}, which AdapterHub's LoRA cannot hold \(AdapterHub gives "
            r"every module one r, and this adapter's modules have \[4, 8\]\)",
        ),
        (
            LoraConfig(target_modules=["o_proj"]),
            "adapts 'model.layers.0.self_attn.o_proj', which AdapterHub's LoRA does not adapt on model_type 'llama'",
        ),
        (
            LoraConfig(target_modules=r".*layers\.0\.self_attn\.q_proj|.*layers\.1\.self_attn\.(q|v)_proj"),
            "leaves 'model.layers.0.self_attn.v_proj' unadapted while adapting the same place in another layer",
        ),
    ],
    ids=["dora", "rslora", "bias", "rank-pattern", "o-proj", "uneven-layers"],
)
def test_what_adapterhubs_lora_cannot_hold_is_refused_on_save(config, message, tmp_path):
    model = get_peft_model(tiny_llama(), config)
    with pytest.raises(ConfigError, match=message) as info:
        model.save_pretrained(tmp_path / "out", format="adapterhub")
    assert str(info.value).endswith("save it in peftkit's format instead: save_pretrained(folder)")
    assert not (tmp_path / "out").exists()


def test_a_model_type_without_a_known_layout_is_refused_on_save(tmp_path):
    model = get_peft_model(tiny_gpt2(), LoraConfig(target_modules=["c_attn"]))
    with pytest.raises(ConfigError, match="cannot be written in AdapterHub's format: .* model_type 'gpt2'"):
        model.save_pretrained(tmp_path / "out", format="adapterhub")


# --- peftkit inspect ----------------------------------------------------------------------------------------
def inspect(folder, *options):
    result = CliRunner().invoke(make_cli(), ["inspect", str(folder), *options], prog_name="peftkit")
    assert result.exit_code == 0, result.output
    return result.output


def test_inspect_shows_an_adapterhub_lora_folder(tmp_path):
    saved_by_adapterhub(tmp_path, LoRAConfig(r=4, init_weights="bert", output_lora=True))
    [adapter] = json.loads(inspect(tmp_path, "--json"))["adapters"]
    assert (adapter["format"], adapter["method"], adapter["peft_type"], adapter["file"]) == (
        "adapterhub",
        "lora",
        "LORA",
        "pytorch_adapter.bin",
    )
    assert adapter["config"]["config"]["architecture"] == "lora"
    tensors = {t["name"]: t["shape"] for t in adapter["tensors"]}
    assert tensors["bert.encoder.layer.1.output.dense.loras.task.lora_A"] == [4, 64]
    assert tensors["bert.encoder.layer.1.output.dense.loras.task.lora_B"] == [32, 4]
    # 2 layers, query, value and output.dense, A and B each
    assert len(tensors) == 12
    assert adapter["notes"][:2] == [
        "head_config.json: a prediction head, which peftkit does not load",
        "pytorch_model_head.bin: a prediction head, which peftkit does not load",
    ]
    assert adapter["notes"][2].startswith("init_weights='bert': peftkit-lora has no such init")
    assert "adapterhub folder; PeftModel.from_pretrained loads it as a lora adapter" in inspect(tmp_path)


def test_inspect_says_why_a_folder_would_not_load(tmp_path):
    saved_by_adapterhub(tmp_path, IA3Config())
    [adapter] = json.loads(inspect(tmp_path, "--json"))["adapters"]
    assert adapter["notes"][-1].startswith(
        f"not loadable: {config_path(tmp_path)} sets the AdapterHub option composition_mode='scale'"
    )
