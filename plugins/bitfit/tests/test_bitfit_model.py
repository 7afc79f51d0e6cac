"""BitFit on real models: what trains, what it computes, disable/merge/unmerge, adapters, files, training."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from peftkit import AdapterLoadError, PeftModel, get_peft_model
from peftkit.serialization import read_tensors
from peftkit.testing.models import randomize_trainable, tiny_bert, tiny_gpt2, tiny_llama, tiny_plain
from peftkit_bitfit import BitFitConfig, BitFitLayer, BitFitLayerNorm
from torch import nn
from transformers.pytorch_utils import Conv1D

IDS = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def expected_trainable(base: nn.Module, layer_norm: bool, heads: tuple[str, ...] = ()) -> int:
    """Counted from the base model's own parameters as the manual recipe picks them: every parameter whose
    name ends with "bias" (each tensor once), plus LayerNorm weights with ``layer_norm``; a task head
    in ``heads`` trains in full instead (weight and bias), as a copy."""
    owners = dict(base.named_modules())
    count = 0
    for name, param in base.named_parameters():  # each tensor once, tied ones included
        path, _, tensor = name.rpartition(".")
        if any(path == head or path.startswith(head + ".") for head in heads):
            count += param.numel()
        elif name.endswith("bias") or (layer_norm and isinstance(owners[path], nn.LayerNorm)):
            count += param.numel()
    return count


def tiny_llama_with_biases():
    return tiny_llama(attention_bias=True, mlp_bias=True)


@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2, tiny_plain, tiny_llama_with_biases])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_by_default_every_bias_of_the_model_trains(build, layer_norm):
    base = build()
    expected = expected_trainable(base, layer_norm)
    model = get_peft_model(base, BitFitConfig(train_layer_norm=layer_norm))
    assert model.get_nb_trainable_parameters()[0] == expected
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert all(
        name.endswith(".bitfit_bias.default") or name.endswith(".bitfit_weight.default") for name in trainable
    )
    # the LayerNorms' biases train by default, their weights only with train_layer_norm
    assert any(".bitfit_weight." in name for name in trainable) == (
        layer_norm and build is not tiny_llama_with_biases
    )


@pytest.mark.parametrize("task", ["seq_cls", "token_cls"])
def test_a_task_head_trains_in_full_and_its_bias_gets_no_offset_too(task):
    """Every bias value trains exactly once: the head's as part of its trained copy, every other through
    an offset. So the count is the model's bias values, less the head's bias, plus the whole head."""
    base = tiny_bert(task=task)
    every_bias = sum(p.numel() for name, p in base.named_parameters() if name.endswith("bias"))
    head = sum(p.numel() for p in base.classifier.parameters())
    expected = every_bias - base.classifier.bias.numel() + head
    assert expected == expected_trainable(base, False, ("classifier",))
    model = get_peft_model(base, BitFitConfig(task_type="SEQ_CLS" if task == "seq_cls" else "TOKEN_CLS"))
    assert model.get_nb_trainable_parameters()[0] == expected
    assert not any(
        isinstance(m, (BitFitLayer, BitFitLayerNorm)) for m in model.base_model.model.classifier.modules()
    )


def adapted(model) -> list[str]:
    return sorted(
        path for path, layer in model.adapter_layers() if isinstance(layer, (BitFitLayer, BitFitLayerNorm))
    )


def test_targeting_by_names_exclusion_layers_and_all_linear():
    model = get_peft_model(tiny_bert(), BitFitConfig(target_modules=["query", "intermediate.dense"]))
    assert adapted(model) == [
        f"bert.encoder.layer.{i}.{part}"
        for i in (0, 1)
        for part in ("attention.self.query", "intermediate.dense")
    ]
    model = get_peft_model(
        tiny_bert(), BitFitConfig(exclude_modules=["dense", "classifier"], layers_to_transform=[1])
    )
    assert adapted(model) == [
        "bert.encoder.layer.1.attention.output.LayerNorm",
        *(f"bert.encoder.layer.1.attention.self.{n}" for n in ("key", "query", "value")),
        "bert.encoder.layer.1.output.LayerNorm",
    ]
    model = get_peft_model(tiny_bert(), BitFitConfig(exclude_modules=r".*LayerNorm", task_type="SEQ_CLS"))
    assert not any(path.endswith("LayerNorm") for path in adapted(model))
    model = get_peft_model(
        tiny_gpt2(), BitFitConfig(target_modules=r".*\.h\.0\..*\.c_proj", train_layer_norm=True)
    )
    assert adapted(model) == [
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.ln_1",
        "transformer.h.0.ln_2",
        "transformer.h.0.mlp.c_proj",
        "transformer.h.1.ln_1",
        "transformer.h.1.ln_2",
        "transformer.ln_f",
    ]
    # all-linear on Llama with biases on attention only: the bias-less MLP and head are left alone
    model = get_peft_model(tiny_llama(attention_bias=True), BitFitConfig(target_modules="all-linear"))
    assert {path.rsplit(".", 1)[1] for path in adapted(model)} == {"q_proj", "k_proj", "v_proj", "o_proj"}


class TinyConv2d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_each_layer_computes_its_base_with_the_shifted_bias():
    """Against an independent reference: the base layer's own functional form with bias b + Δb."""
    torch.manual_seed(0)
    gpt2, plain, conv2d = tiny_gpt2(), tiny_plain(), TinyConv2d()
    for base, config, x_shape in (
        (gpt2, BitFitConfig(target_modules=["c_fc"]), (2, 4, 32)),
        (plain, BitFitConfig(target_modules=["conv", "fc1"]), None),
        (conv2d, BitFitConfig(), (2, 3, 6, 6)),
    ):
        model = randomize_trainable(get_peft_model(base, config))
        for _, layer in model.adapter_layers():
            inner, offset = layer.base_layer, layer.bitfit_bias["default"]
            shifted = inner.bias + offset
            if isinstance(inner, Conv1D):
                x = torch.randn(x_shape)
                expected = torch.addmm(shifted, x.view(-1, x.shape[-1]), inner.weight).view(2, 4, -1)
            elif isinstance(inner, nn.Linear):
                x = torch.randn(2, 4, inner.in_features)
                expected = F.linear(x, inner.weight, shifted)
            elif isinstance(inner, nn.Conv1d):
                x = torch.randn(2, inner.in_channels, 7)
                expected = F.conv1d(x, inner.weight, shifted, padding=1)
            else:
                x = torch.randn(x_shape)
                expected = F.conv2d(x, inner.weight, shifted, padding=1)
            with torch.no_grad():
                torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)


def test_layer_norm_scales_and_shifts_with_the_offsets():
    model = randomize_trainable(get_peft_model(tiny_plain(), BitFitConfig(train_layer_norm=True)))
    layer = model.base_model.model.norm
    norm, x = layer.base_layer, torch.randn(2, 5, 32)
    normalized = (x - x.mean(-1, keepdim=True)) / torch.sqrt(
        x.var(-1, unbiased=False, keepdim=True) + norm.eps
    )
    gamma = norm.weight + layer.bitfit_weight["default"]
    beta = norm.bias + layer.bitfit_bias["default"]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), normalized * gamma + beta, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2, tiny_plain])
def test_disable_adapter_gives_back_the_base_model_bitwise(build):
    base = build()
    reference = logits(base)
    model = randomize_trainable(get_peft_model(base, BitFitConfig(train_layer_norm=True)))
    adapted_out = logits(model)
    assert not torch.allclose(adapted_out, reference)
    with model.disable_adapter():
        assert torch.equal(logits(model), reference)
    assert torch.equal(logits(model), adapted_out)


def unwrapped_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's own parameters, under their names before any adapter layer wrapped them."""
    return {
        name.replace(".base_layer", ""): p.detach().clone()
        for name, p in model.named_parameters()
        if ".bitfit_" not in name
    }


@pytest.mark.parametrize("layer_norm", [False, True])
def test_merge_folds_the_offsets_into_biases_and_unmerge_takes_them_out(layer_norm):
    base = tiny_gpt2()
    before = unwrapped_parameters(base)
    model = randomize_trainable(get_peft_model(base, BitFitConfig(train_layer_norm=layer_norm)))
    offsets = {
        f"{path}.{tensor.removeprefix('bitfit_')}": p.detach().clone()
        for path, layer in model.adapter_layers()
        for tensor, p in layer.adapter_parameters("default")
    }
    # four bias layers per block; five LayerNorms with their bias, and their weight with train_layer_norm
    assert len(offsets) == 4 * 2 + 5 * (2 if layer_norm else 1)
    unmerged = logits(model)
    model.merge_adapter()
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=1e-5)
    after = unwrapped_parameters(base)
    for name, original in before.items():
        # dense weights stay as they were
        expected = original + offsets[name] if name in offsets else original
        assert torch.equal(after[name], expected), name
    model.unmerge_adapter()
    for name, value in unwrapped_parameters(base).items():
        torch.testing.assert_close(value, before[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-6, rtol=1e-6)


def test_merged_layer_norm_computes_bitwise_what_the_unmerged_one_did():
    model = randomize_trainable(
        get_peft_model(tiny_plain(), BitFitConfig(target_modules=["fc1"], train_layer_norm=True))
    )
    norm = model.base_model.model.norm
    x = torch.randn(3, 32)
    with torch.no_grad():
        unmerged = norm(x)
        norm.merge()
        assert torch.equal(norm(x), unmerged)


def test_merge_and_unload_gives_a_plain_model_with_shifted_biases():
    base = tiny_bert()
    original_bias = base.bert.pooler.dense.bias.detach().clone()
    model = randomize_trainable(get_peft_model(base, BitFitConfig(task_type="SEQ_CLS")))
    offset = model.base_model.model.bert.pooler.dense.bitfit_bias["default"].detach().clone()
    out = logits(model)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, (BitFitLayer, BitFitLayerNorm)) for m in merged.modules())
    assert isinstance(merged.bert.pooler.dense, nn.Linear)
    assert torch.equal(merged.bert.pooler.dense.bias, original_bias + offset)
    torch.testing.assert_close(logits(merged), out, atol=1e-5, rtol=1e-5)


def test_safe_merge_refuses_non_finite_offsets_and_changes_nothing():
    model = get_peft_model(tiny_plain(), BitFitConfig(target_modules=["fc2"]))
    layer = model.base_model.model.fc2
    bias = layer.base_layer.bias.detach().clone()
    with torch.no_grad():
        layer.bitfit_bias["default"][0] = float("inf")
    with pytest.raises(ValueError, match="merging BitFit adapter 'default' gives NaN or inf biases"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.bias, bias) and not layer.merged_adapters


def randomize_trainable_adapter(model, adapter_name: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.adapter_layers():
            for _, p in layer.adapter_parameters(adapter_name):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def test_adapters_switch_combine_and_delete():
    base = tiny_bert()
    reference = logits(base)
    model = get_peft_model(base, BitFitConfig(target_modules=["value", "dense"]))
    randomize_trainable_adapter(model, "default", seed=1)
    model.add_adapter("other", BitFitConfig(train_layer_norm=True))
    randomize_trainable_adapter(model, "other", seed=2)
    model.set_adapter("other")
    out_other = logits(model)
    model.set_adapter("default")
    out_default = logits(model)
    assert not torch.allclose(out_default, out_other) and not torch.allclose(out_default, reference)
    # both active: their offsets add up, which is what merging one after the other gives
    model.set_adapter(["default", "other"])
    both = logits(model)
    model.delete_adapter("default")
    assert model.active_adapters == ["other"]
    assert torch.equal(logits(model), out_other)
    with model.disable_adapter():
        assert torch.equal(logits(model), reference)
    model.add_adapter("default", BitFitConfig(target_modules=["value", "dense"]))
    randomize_trainable_adapter(model, "default", seed=1)
    model.set_adapter(["default", "other"])
    assert torch.equal(logits(model), both)
    model.merge_adapter(["default", "other"])
    torch.testing.assert_close(logits(model), both, atol=1e-5, rtol=1e-5)


def test_by_default_the_file_holds_the_layer_norm_bias_but_not_its_weight(tmp_path):
    get_peft_model(tiny_plain(), BitFitConfig()).save_pretrained(tmp_path)
    assert sorted(key.removeprefix("base_model.model.") for key in read_tensors(tmp_path)) == [
        f"{path}.bitfit_bias" for path in ("conv", "fc1", "fc2", "head", "norm")
    ]


def test_saved_file_holds_only_the_offsets_under_clear_names(tmp_path):
    model = randomize_trainable(get_peft_model(tiny_plain(), BitFitConfig(train_layer_norm=True)))
    out = logits(model)
    model.save_pretrained(tmp_path)
    tensors = read_tensors(tmp_path)
    assert sorted(tensors) == [
        "base_model.model.conv.bitfit_bias",
        "base_model.model.fc1.bitfit_bias",
        "base_model.model.fc2.bitfit_bias",
        "base_model.model.head.bitfit_bias",
        "base_model.model.norm.bitfit_bias",
        "base_model.model.norm.bitfit_weight",
    ]
    assert torch.equal(
        tensors["base_model.model.norm.bitfit_weight"], model.base_model.model.norm.bitfit_weight["default"]
    )
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "BITFIT" and config["train_layer_norm"] is True
    loaded = PeftModel.from_pretrained(tiny_plain(), tmp_path)
    assert torch.equal(logits(loaded), out)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = PeftModel.from_pretrained(tiny_plain(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == sum(t.numel() for t in tensors.values())


def test_loading_onto_a_model_of_another_size_names_the_tensor(tmp_path):
    get_peft_model(tiny_plain(hidden_size=16), BitFitConfig(target_modules=["fc1"])).save_pretrained(tmp_path)
    with pytest.raises(AdapterLoadError, match=r"'base_model.model.fc1.bitfit_bias' has shape \(32,\)"):
        PeftModel.from_pretrained(tiny_plain(hidden_size=32), tmp_path)


def test_a_short_training_run_on_a_bert_classifier_lowers_the_loss():
    torch.manual_seed(0)
    base = tiny_bert(hidden_size=32)
    # label 1: token 7 at position 3; label 0: random tokens (never 7)
    ids = torch.randint(8, 128, (32, 8))
    labels = torch.arange(32) % 2
    ids[labels == 1, 3] = 7
    model = get_peft_model(base, BitFitConfig(task_type="SEQ_CLS", train_layer_norm=True))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0], losses
    moved = model.base_model.model.bert.encoder.layer[0].attention.self.value.bitfit_bias["default"]
    assert moved.abs().max() > 0


# --- errors ------------------------------------------------------------------------------------------
def test_a_named_target_without_a_bias_is_refused():
    with pytest.raises(Exception) as info:
        get_peft_model(tiny_llama(), BitFitConfig(target_modules=["q_proj"]))
    assert type(info.value).__name__ == "TargetModulesError"
    assert str(info.value) == (
        "BitFitConfig.target_modules matched 'model.layers.0.self_attn.q_proj', but its Linear has no bias, "
        "and BitFit only offsets biases a layer has"
    )


def test_a_named_target_that_is_no_bias_layer_is_refused():
    with pytest.raises(
        ValueError, match=r"matched 'embed', but BitFit does not adapt embedding layers; it adapts Linear"
    ):
        get_peft_model(tiny_plain(), BitFitConfig(target_modules=["embed"]))
    with pytest.raises(
        ValueError,
        # the class is BertSdpaSelfAttention on transformers 4, BertSelfAttention on 5
        match=r"matched 'bert.encoder.layer.0.attention.self', but BitFit does not adapt Bert\w*SelfAttention layers",
    ):
        get_peft_model(tiny_bert(), BitFitConfig(target_modules=r".*layer\.0\.attention\.self"))


def test_a_named_layer_norm_trains_its_bias_and_with_train_layer_norm_its_weight():
    model = get_peft_model(tiny_plain(), BitFitConfig(target_modules=["norm"]))
    assert adapted(model) == ["norm"]
    assert [name for name, _ in model.base_model.model.norm.adapter_parameters("default")] == ["bitfit_bias"]
    model = get_peft_model(tiny_plain(), BitFitConfig(target_modules=["norm"], train_layer_norm=True))
    assert [name for name, _ in model.base_model.model.norm.adapter_parameters("default")] == [
        "bitfit_weight",
        "bitfit_bias",
    ]
    no_bias = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4, bias=False))
    with pytest.raises(
        ValueError,
        match=r"matched '1', but its LayerNorm has no bias; set train_layer_norm=True to train its weight",
    ):
        get_peft_model(no_bias, BitFitConfig(target_modules=["1"]))


def test_no_module_matched_gives_the_cores_hint():
    with pytest.raises(
        ValueError, match=r"target_modules=\['qeury'\] matched no module .* did you mean 'query'"
    ):
        get_peft_model(tiny_bert(), BitFitConfig(target_modules=["qeury"]))


def test_a_model_without_biases_says_there_is_nothing_to_train_and_what_would():
    with pytest.raises(ValueError) as info:
        get_peft_model(tiny_llama(), BitFitConfig())
    assert type(info.value).__name__ == "TargetModulesError"
    assert str(info.value) == (
        "BitFitConfig(target_modules=None) found nothing to train in LlamaForCausalLM: no module in scope "
        "(outside exclude_modules and modules_to_save) has a bias, and BitFit trains biases only; a model "
        "without biases (Llama, Mistral and T5 have none) needs a method that adapts weights, such as LoRA"
    )
    # Llama's RMSNorms are no LayerNorms: train_layer_norm finds nothing either
    with pytest.raises(ValueError, match="no module in scope .* has a bias, and BitFit trains biases only"):
        get_peft_model(tiny_llama(), BitFitConfig(train_layer_norm=True))
    bias_free_norms = nn.Sequential(nn.Linear(4, 4, bias=False), nn.LayerNorm(4, bias=False))
    with pytest.raises(
        ValueError, match=r"; its LayerNorms have a weight: set train_layer_norm=True to train those$"
    ):
        get_peft_model(bias_free_norms, BitFitConfig())
    model = get_peft_model(bias_free_norms, BitFitConfig(train_layer_norm=True))
    assert model.get_nb_trainable_parameters()[0] == 4
    # a LayerNorm's bias is a bias: it trains by default, its weight with train_layer_norm
    only_norms = nn.Sequential(nn.Linear(4, 4, bias=False), nn.LayerNorm(4))
    assert get_peft_model(only_norms, BitFitConfig()).get_nb_trainable_parameters()[0] == 4
    assert (
        get_peft_model(only_norms, BitFitConfig(train_layer_norm=True)).get_nb_trainable_parameters()[0] == 8
    )


def test_all_linear_without_biased_linear_layers_points_to_the_default():
    only_norms = nn.Sequential(nn.Linear(4, 4, bias=False), nn.LayerNorm(4), nn.Linear(4, 4, bias=False))
    with pytest.raises(ValueError) as info:
        get_peft_model(only_norms, BitFitConfig(target_modules="all-linear"))
    assert str(info.value).endswith(
        "none of the modules target_modules selects (outside exclude_modules and modules_to_save) has a bias; "
        "target_modules=None offsets every bias BitFit can, LayerNorms' included"
    )


def test_an_adapter_saved_without_layer_norm_biases_names_the_missing_tensor_and_loads_with_a_config(
    tmp_path,
):
    """What 0.1 saved for BitFitConfig(): no LayerNorm offsets. The config it wrote now implies them."""
    model = randomize_trainable(get_peft_model(tiny_bert(), BitFitConfig(exclude_modules=r".*LayerNorm")))
    out = logits(model)
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    written = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**written, "exclude_modules": None}))
    with pytest.raises(
        AdapterLoadError, match=r"no tensor 'base_model\.model\.bert\.embeddings\.LayerNorm\."
    ):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)
    loaded = PeftModel.from_pretrained(
        tiny_bert(), tmp_path, config=BitFitConfig(exclude_modules=r".*LayerNorm")
    )
    assert torch.equal(logits(loaded), out)
