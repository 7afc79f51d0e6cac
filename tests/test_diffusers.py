"""diffusers models with peftkit: adapters on a UNet and a DiT, training, and diffusers' LoRA files both ways.

Every comparison is against diffusers itself: a file :func:`save_lora_weights` writes is loaded by
diffusers' own loaders (the pipeline's ``lora_state_dict`` + ``load_lora_into_*``, which is what
``pipeline.load_lora_weights`` runs, and ``model.load_lora_adapter``), and a file diffusers writes, or a
kohya file diffusers converts, is loaded by both and the outputs compared.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import peftkit
import pytest
import torch
from click.testing import CliRunner
from diffusers import StableDiffusionPipeline
from diffusers.loaders import SD3LoraLoaderMixin, StableDiffusionLoraLoaderMixin
from peftkit import AdapterLoadError, ConfigError, TargetModulesError
from peftkit.cli import make_cli
from peftkit.integrations.diffusers import WEIGHT_NAME, load_lora_weights, save_lora_weights
from peftkit.testing.diffusion_models import sd3_inputs, tiny_sd3_transformer, tiny_unet, unet_inputs
from peftkit.testing.models import randomize_trainable
from peftkit_loha import LoHaConfig
from peftkit_lokr import LoKrConfig
from peftkit_lora import LoraConfig
from safetensors import safe_open
from safetensors.torch import save_file

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
DIT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "pos_embed.proj"]
MODELS = {
    # prefix: (model factory, inputs factory, targets)
    "unet": (tiny_unet, unet_inputs, UNET_TARGETS),
    "transformer": (tiny_sd3_transformer, sd3_inputs, DIT_TARGETS),
}
CONFIGS = {
    "lora": lambda targets: LoraConfig(r=4, lora_alpha=8, target_modules=targets),
    "loha": lambda targets: LoHaConfig(r=4, alpha=8, target_modules=targets),
    "lokr": lambda targets: LoKrConfig(r=4, alpha=8, target_modules=targets),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: their ops run faster on one thread than split over two on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def output(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


def assert_same_outputs(loaded, model, inputs, base, atol=1e-6):
    """``loaded`` computes what ``model`` does, and that is not what the bare ``base`` computes."""
    expected = output(model, inputs)
    torch.testing.assert_close(output(loaded, inputs), expected, rtol=0, atol=atol)
    assert (expected - output(base, inputs)).abs().max() > 1e-3  # the adapter is there to be compared


def trained_lora(prefix: str, config=None):
    """A peftkit adapter with random (trained-looking) weights on a fresh model of ``prefix``'s kind."""
    make, _, targets = MODELS[prefix]
    config = config or LoraConfig(
        r=4, lora_alpha=6, target_modules=targets, rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 3}
    )
    return randomize_trainable(peftkit.get_peft_model(make(), config), seed=3)


# --- adapters on diffusion models, and a training step --------------------------------------------------
@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("prefix", sorted(MODELS))
def test_adapters_on_attention_and_convolutions_train_alone(prefix, method):
    make, inputs_for, targets = MODELS[prefix]
    base = make()
    inputs = inputs_for()
    expected = output(base, inputs)
    model = peftkit.get_peft_model(base, CONFIGS[method](targets))
    paths = [path for path, _ in model.adapter_layers()]
    assert all(any(path == target or path.endswith("." + target) for path in paths) for target in targets)
    kinds = {layer.features.kind for _, layer in model.adapter_layers()}
    assert kinds == {"linear", "conv2d"}
    torch.testing.assert_close(output(model, inputs), expected, rtol=0, atol=1e-6)  # identity at init

    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(
        any(tag in name for tag in ("lora_", "hada_", "lokr_"))
        for name, p in model.named_parameters()
        if p.requires_grad
    )
    initial = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    target = torch.randn(expected.shape, generator=torch.Generator().manual_seed(5))
    model.train()
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.mse_loss(model(**inputs).sample, target)
        loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
        assert all(p.grad is not None for p in trainable)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # every adapter tensor learned
    assert all(not torch.equal(p, before) for p, before in zip(trainable, initial))
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


def _training_step(model, inputs, target) -> tuple[torch.Tensor, list[torch.Tensor]]:
    for param in model.parameters():
        param.grad = None
    loss = torch.nn.functional.mse_loss(model(**inputs).sample.float(), target)
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("prefix", sorted(MODELS))
def test_a_training_step_under_autocast_is_the_float32_step_in_low_precision(prefix, method, dtype):
    """Diffusion models train under autocast (bf16/fp16): the step runs, the adapter's gradients reach it in
    float32, and loss and gradients agree with the float32 step within the dtype's precision."""
    make, inputs_for, targets = MODELS[prefix]
    model = randomize_trainable(peftkit.get_peft_model(make(), CONFIGS[method](targets)), seed=3).train()
    inputs = inputs_for()
    target = torch.randn(output(model, inputs).shape, generator=torch.Generator().manual_seed(5))
    loss, grads = _training_step(model, inputs, target)
    with torch.autocast("cpu", dtype=dtype):
        low_loss, low_grads = _training_step(model, inputs, target)
    # measured here at most 6.3 units of roundoff (gradients in norm) and 0.08 (loss); 16 leaves room
    tolerance = 16 * torch.finfo(dtype).eps
    torch.testing.assert_close(low_loss, loss, rtol=tolerance, atol=0)
    assert all(g.dtype == torch.float32 for g in low_grads)
    whole = torch.cat([g.flatten() for g in grads]).norm()
    for low, full in zip(low_grads, grads):
        assert (low - full).norm() <= tolerance * max(full.norm(), whole / len(grads))


@pytest.mark.parametrize("prefix", sorted(MODELS))
def test_compiles_as_one_graph_and_never_recompiles(prefix):
    make, inputs_for, _ = MODELS[prefix]
    model = trained_lora(prefix).train()
    inputs = inputs_for()
    expected = model(**inputs).sample.detach()
    torch._dynamo.reset()
    step = torch.compile(lambda: model(**inputs).sample, backend="aot_eager", fullgraph=True)
    try:
        for call in range(2):
            with torch._dynamo.config.patch(error_on_recompile=call > 0):
                out = step()
            out.sum().backward()
            torch.testing.assert_close(out.detach(), expected, rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()


# --- peftkit -> diffusers -------------------------------------------------------------------------------
def _tiny_sd_pipeline(unet) -> StableDiffusionPipeline:
    """A Stable Diffusion pipeline around ``unet``; its other parts are tiny and never run here."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=8,
            intermediate_size=16,
            num_attention_heads=2,
            num_hidden_layers=1,
            vocab_size=32,
            bos_token_id=0,
            eos_token_id=1,
        )
    )
    vae = AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=4,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=None,
        unet=unet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def test_saved_unet_lora_loads_in_a_stable_diffusion_pipeline(tmp_path):
    model = trained_lora("unet")
    path = save_lora_weights(model, tmp_path, prefix="unet")
    assert path == tmp_path / WEIGHT_NAME
    inputs = unet_inputs()
    pipeline = _tiny_sd_pipeline(tiny_unet())
    pipeline.load_lora_weights(str(tmp_path))
    assert pipeline.unet.peft_config  # diffusers' PEFT adapter, built from the file
    assert_same_outputs(pipeline.unet, model, inputs, tiny_unet())


@pytest.mark.parametrize("prefix", sorted(MODELS))
def test_saved_lora_loads_with_load_lora_adapter(tmp_path, prefix):
    make, inputs_for, _ = MODELS[prefix]
    model = trained_lora(prefix)
    save_lora_weights(model, tmp_path, prefix=prefix)
    inputs = inputs_for()
    base = make()
    base.load_lora_adapter(str(tmp_path), prefix=prefix, weight_name=WEIGHT_NAME)
    assert_same_outputs(base, model, inputs, make())


def test_saved_dit_lora_loads_through_the_sd3_pipeline_loader(tmp_path):
    """What ``StableDiffusion3Pipeline.load_lora_weights`` runs for its transformer: the file's state dict
    and metadata read by the SD3 loader, put into the transformer by ``load_lora_into_transformer``."""
    model = trained_lora("transformer")
    save_lora_weights(model, tmp_path, prefix="transformer")
    state, metadata = SD3LoraLoaderMixin.lora_state_dict(str(tmp_path), return_lora_metadata=True)
    assert all(key.startswith("transformer.") for key in state)
    assert metadata["transformer.r"] == 4 and metadata["transformer.rank_pattern"] == {"to_k": 2}
    base = tiny_sd3_transformer()
    SD3LoraLoaderMixin.load_lora_into_transformer(state, base, metadata=metadata)
    assert_same_outputs(base, model, sd3_inputs(), tiny_sd3_transformer())


def test_saved_file_keys_and_metadata_are_the_pipeline_format(tmp_path):
    model = trained_lora("unet")
    save_lora_weights(model, tmp_path, prefix="unet")
    with safe_open(str(tmp_path / WEIGHT_NAME), framework="pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    layer_paths = [path for path, _ in model.adapter_layers()]
    assert keys == {f"unet.{path}.lora_{ab}.weight" for path in layer_paths for ab in "AB"}
    fields = json.loads(metadata["lora_adapter_metadata"])
    assert fields["unet.lora_alpha"] == 6 and fields["unet.alpha_pattern"] == {"to_v": 3}
    assert fields["unet.target_modules"] == UNET_TARGETS
    assert metadata["peftkit.method"] == "lora"


def test_saved_lokr_loads_with_load_lora_adapter(tmp_path):
    model = trained_lora("unet", LoKrConfig(r=2, alpha=3, target_modules=["to_q", "to_v", "conv1"]))
    save_lora_weights(model, tmp_path, prefix="unet")
    base = tiny_unet()
    base.load_lora_adapter(str(tmp_path), prefix="unet", weight_name=WEIGHT_NAME)
    inputs = unet_inputs()
    assert_same_outputs(base, model, inputs, tiny_unet())
    # and back into peftkit from the same file
    again = load_lora_weights(tiny_unet(), tmp_path, prefix="unet")
    assert_same_outputs(again, model, inputs, tiny_unet(), atol=0)


def test_saving_keeps_other_files_and_replaces_the_weights(tmp_path):
    (tmp_path / "README.md").write_text("a pipeline folder")
    save_lora_weights(trained_lora("unet"), tmp_path)
    save_lora_weights(trained_lora("unet", LoraConfig(r=2, target_modules=["to_q"])), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", WEIGHT_NAME]
    with safe_open(str(tmp_path / WEIGHT_NAME), framework="pt") as handle:
        assert all(".to_q." in key for key in handle.keys())


def test_save_refuses_a_prefix_the_pipeline_would_not_load(tmp_path):
    with pytest.raises(ConfigError) as unet_error:
        save_lora_weights(trained_lora("unet"), tmp_path, prefix="transformer")
    assert str(unet_error.value) == (
        "a UNet2DConditionModel is a pipeline's 'unet' (pipeline.unet); got prefix='transformer', under which "
        "pipeline.load_lora_weights would find no tensors for it. Use prefix='unet'"
    )
    with pytest.raises(
        ConfigError, match=r"is a pipeline's 'transformer' \(pipeline.transformer\); got prefix='unet'"
    ):
        save_lora_weights(trained_lora("transformer"), tmp_path, prefix="unet")
    with pytest.raises(ConfigError, match=r"prefix must be the pipeline component's name.*got 'unet\.down'"):
        save_lora_weights(trained_lora("unet"), tmp_path, prefix="unet.down")
    assert not (tmp_path / WEIGHT_NAME).exists()
    # a pipeline's second model of a kind (Wan 2.2's transformer_2) takes its own name
    save_lora_weights(trained_lora("transformer"), tmp_path, prefix="transformer_2")
    with safe_open(str(tmp_path / WEIGHT_NAME), framework="pt") as handle:
        assert all(key.startswith("transformer_2.") for key in handle.keys())


def test_save_refuses_methods_diffusers_cannot_load(tmp_path):
    model = peftkit.get_peft_model(tiny_unet(), LoHaConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(ConfigError, match="is a loha adapter; diffusers loads LoRA and LoKr adapters only"):
        save_lora_weights(model, tmp_path)
    with pytest.raises(TypeError, match="takes a peftkit PeftModel"):
        save_lora_weights(tiny_unet(), tmp_path)


# --- diffusers -> peftkit -------------------------------------------------------------------------------
def _diffusers_trained_file(folder, with_metadata: bool):
    """A LoRA file as diffusers' training scripts save a UNet's: PEFT adapter on the model, pipeline save."""
    import peft
    from peft.utils import get_peft_model_state_dict

    unet = tiny_unet()
    config = peft.LoraConfig(
        r=4,
        lora_alpha=2,
        target_modules=UNET_TARGETS,
        init_lora_weights="gaussian",
        rank_pattern={"conv2": 2},
    )
    unet.add_adapter(config)
    randomize_trainable(unet, seed=4)
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        folder,
        unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=config.to_dict() if with_metadata else None,
    )


@pytest.mark.parametrize("with_metadata", [True, False], ids=["with-metadata", "no-metadata"])
def test_diffusers_lora_file_loads_into_peftkit(tmp_path, with_metadata):
    _diffusers_trained_file(tmp_path, with_metadata)
    inputs = unet_inputs()
    pipeline = _tiny_sd_pipeline(tiny_unet())
    pipeline.load_lora_weights(str(tmp_path))
    model = load_lora_weights(tiny_unet(), tmp_path, prefix="unet")
    assert isinstance(model, peftkit.PeftModel)
    assert not any(p.requires_grad for p in model.parameters())  # loaded for inference, as PEFT loads
    assert_same_outputs(model, pipeline.unet, inputs, tiny_unet())
    # and out again: the same file diffusers reads
    save_lora_weights(model, tmp_path / "again")
    base = tiny_unet()
    base.load_lora_adapter(str(tmp_path / "again"), prefix="unet", weight_name=WEIGHT_NAME)
    assert_same_outputs(base, model, inputs, tiny_unet())


def test_model_save_lora_adapter_file_loads_with_no_prefix(tmp_path):
    """A model's own ``save_lora_adapter`` writes keys and metadata without a component prefix."""
    import peft

    dit = tiny_sd3_transformer()
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=DIT_TARGETS)
    dit.add_adapter(config)
    randomize_trainable(dit, seed=6)
    dit.save_lora_adapter(str(tmp_path))
    inputs = sd3_inputs()
    model = load_lora_weights(tiny_sd3_transformer(), tmp_path, prefix=None)
    assert_same_outputs(model, dit, inputs, tiny_sd3_transformer())
    with pytest.raises(
        AdapterLoadError, match="its keys have no component prefix .*; load it with prefix=None"
    ):
        load_lora_weights(tiny_sd3_transformer(), tmp_path, prefix="transformer")
    report = json.loads(invoke("inspect", "--json", str(tmp_path)).stdout)
    (entry,) = report["adapters"]
    assert (entry["name"], entry["component"], entry["config_source"]) == ("default", None, "metadata")
    assert entry["config"]["lora_alpha"] == 3


def _kohya_file(path, unet, rank: int = 4, alpha: float = 2.0):
    """A kohya-ss LoRA for ``unet``: ``lora_unet_<path with _>.lora_down/.lora_up/.alpha`` on attention
    projections, ``proj_in``, ResNet convolutions and the time projection (with a text-encoder entry too)."""
    generator = torch.Generator().manual_seed(7)
    tensors = {}
    for name, module in unet.named_modules():
        if not re.search(r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|proj_in|conv1|conv2|time_emb_proj)$", name):
            continue
        root = "lora_unet_" + name.replace(".", "_")
        if isinstance(module, torch.nn.Conv2d):
            kernel = module.kernel_size
            down = torch.randn(rank, module.in_channels, *kernel, generator=generator) * 0.2
            up = torch.randn(module.out_channels, rank, 1, 1, generator=generator) * 0.2
        else:
            down = torch.randn(rank, module.in_features, generator=generator) * 0.2
            up = torch.randn(module.out_features, rank, generator=generator) * 0.2
        tensors |= {
            f"{root}.lora_down.weight": down,
            f"{root}.lora_up.weight": up,
            f"{root}.alpha": torch.tensor(alpha),
        }
    # a text-encoder attention as kohya's SD files hold them: for the pipeline's text encoder, not the UNet
    for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
        root = f"lora_te_text_model_encoder_layers_0_self_attn_{projection}"
        tensors |= {
            f"{root}.lora_down.weight": torch.randn(rank, 8, generator=generator),
            f"{root}.lora_up.weight": torch.zeros(8, rank),
            f"{root}.alpha": torch.tensor(alpha),
        }
    save_file(tensors, str(path))
    return tensors


def test_kohya_file_loads_into_peftkit_as_diffusers_converts_it(tmp_path):
    file = tmp_path / "my_style.safetensors"
    tensors = _kohya_file(file, tiny_unet())
    inputs = unet_inputs()
    pipeline = _tiny_sd_pipeline(tiny_unet())
    pipeline.load_lora_weights(str(file))
    model = load_lora_weights(tiny_unet(), file, prefix="unet")
    layers = dict(model.adapter_layers())
    assert len(layers) == sum(key.startswith("lora_unet_") and key.endswith(".alpha") for key in tensors)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0" in layers
    assert "up_blocks.1.resnets.0.time_emb_proj" in layers
    assert_same_outputs(model, pipeline.unet, inputs, tiny_unet())
    # alpha 2 over rank 4: the delta is half of up @ down
    assert layers["down_blocks.0.resnets.0.conv1"].scaling["default"] == 0.5
    # a folder holding only that file reads the same
    again = load_lora_weights(tiny_unet(), tmp_path, prefix="unet")
    torch.testing.assert_close(output(again, inputs), output(model, inputs), rtol=0, atol=0)


def test_loaded_adapter_can_join_a_peft_model_and_train(tmp_path):
    _diffusers_trained_file(tmp_path, with_metadata=True)
    model = peftkit.get_peft_model(tiny_unet(), LoraConfig(r=2, target_modules=["to_q"]))
    same = load_lora_weights(model, tmp_path, prefix="unet", adapter_name="style", is_trainable=True)
    assert same is model and sorted(model.peft_config) == ["default", "style"]
    model.set_adapter("style")
    assert any(p.requires_grad for n, p in model.named_parameters() if ".style" in n or "style." in n)


# --- bad input --------------------------------------------------------------------------------------------
def test_wrong_prefix_names_the_components_the_file_has(tmp_path):
    save_lora_weights(trained_lora("unet"), tmp_path)
    with pytest.raises(AdapterLoadError) as error:
        load_lora_weights(tiny_unet(), tmp_path, prefix="transformer")
    assert str(error.value) == (
        f"{str(tmp_path / WEIGHT_NAME)!r} holds no tensors under prefix 'transformer'; its keys start with 'unet': "
        "pass one of those as prefix"
    )


def test_kohya_file_with_a_dit_prefix_is_refused(tmp_path):
    file = tmp_path / "k.safetensors"
    _kohya_file(file, tiny_unet())
    with pytest.raises(
        AdapterLoadError,
        match=r"has kohya's keys \('lora_unet_...'\), which hold a UNet's LoRA "
        r"\(components: 'text_encoder', 'unet'\); load it into the UNet with prefix='unet', "
        r"not prefix='transformer'",
    ):
        load_lora_weights(tiny_sd3_transformer(), file, prefix="transformer")


def test_file_without_lora_keys_is_refused(tmp_path):
    file = tmp_path / "model.safetensors"
    save_file({"conv_in.weight": torch.zeros(2, 2), "conv_in.bias": torch.zeros(2)}, str(file))
    with pytest.raises(AdapterLoadError) as error:
        load_lora_weights(tiny_unet(), file)
    assert str(error.value) == (
        f"{str(file)!r} holds no LoRA tensors: diffusers' keys look like 'unet.<module>.lora_A.weight' (or "
        "'.lokr_w1'), kohya's like 'lora_unet_<module>.lora_down.weight'; its keys are: 'conv_in.bias', "
        "'conv_in.weight'"
    )


def test_lora_for_another_model_is_refused(tmp_path):
    save_lora_weights(trained_lora("unet"), tmp_path)
    with pytest.raises(
        AdapterLoadError,
        match=r"adapts module 'down_blocks\.0\.attentions\.0\..*' \(48 of 48 modules "
        r"missing\), which this SD3Transformer2DModel does not have: the LoRA was made for another "
        r"model or another component than 'unet'",
    ):
        load_lora_weights(tiny_sd3_transformer(), tmp_path, prefix="unet")


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(AdapterLoadError, match="LoRA file or folder .*nope' does not exist"):
        load_lora_weights(tiny_unet(), tmp_path / "nope")
    with pytest.raises(AdapterLoadError, match=r"has no pytorch_lora_weights\.safetensors \(nor any other"):
        load_lora_weights(tiny_unet(), tmp_path)
    with pytest.raises(AdapterLoadError, match=r"has no file 'x\.safetensors'"):
        load_lora_weights(tiny_unet(), tmp_path, weight_name="x.safetensors")


def test_target_modules_errors_name_the_model_and_diffusers_layer_names():
    with pytest.raises(TargetModulesError, match="matched no module of UNet2DConditionModel"):
        peftkit.get_peft_model(tiny_unet(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TargetModulesError) as error:
        peftkit.get_peft_model(tiny_unet(), LoraConfig())
    assert str(error.value) == (
        "LoraConfig.target_modules is None and peftkit-lora has no default for model_type None; name the "
        "modules to adapt (e.g. target_modules=['to_q', 'to_k', 'to_v', 'to_out.0'])"
    )


@pytest.mark.parametrize("prefix", sorted(MODELS))
def test_all_linear_adapts_every_linear_layer_as_peft_does(prefix):
    """diffusers names a layer "to_out.0" beside blocks named "down_blocks.0": "all-linear" must select the
    linear layers only (PEFT's set), not every module whose path ends in ".0"."""
    import peft

    make = MODELS[prefix][0]
    linear = {name for name, module in make().named_modules() if isinstance(module, torch.nn.Linear)}
    model = peftkit.get_peft_model(make(), LoraConfig(r=2, target_modules="all-linear"))
    assert {path for path, _ in model.adapter_layers()} == linear
    reference = peft.get_peft_model(make(), peft.LoraConfig(r=2, target_modules="all-linear"))
    adapted = {
        name for name, module in reference.get_base_model().named_modules() if hasattr(module, "lora_A")
    }
    assert adapted == linear


# --- peftkit inspect --------------------------------------------------------------------------------------
def invoke(*args: str):
    return CliRunner().invoke(make_cli(), list(args), prog_name="peftkit")


def test_inspect_reads_a_diffusers_lora_folder(tmp_path):
    save_lora_weights(trained_lora("unet"), tmp_path)
    result = invoke("inspect", str(tmp_path))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"Adapter 'unet' at {tmp_path / WEIGHT_NAME}"
    assert lines[1].startswith("  method:     LORA, method 'lora' of plugin 'lora' (peftkit-lora ")
    assert lines[2] == (
        "  format:     diffusers LoRA file, component 'unet' (pipeline.load_lora_weights, or "
        "load_lora_adapter(prefix='unet'))"
    )
    assert re.search(r"^    r\s+4$", result.stdout, re.M)
    assert re.search(r"^    alpha_pattern\s+\{\"to_v\": 3\}$", result.stdout, re.M)
    assert re.search(
        r"^    unet\.down_blocks\.0\.resnets\.0\.conv1\.lora_A\.weight\s+\(4, 8, 3, 3\)\s+float32\s+288$",
        result.stdout,
        re.M,
    )
    report = json.loads(invoke("inspect", "--json", str(tmp_path / WEIGHT_NAME)).stdout)
    (entry,) = report["adapters"]
    assert (entry["format"], entry["component"], entry["config_source"]) == ("diffusers", "unet", "metadata")
    assert entry["config"]["target_modules"] == UNET_TARGETS
    assert "lora_adapter_metadata" not in entry["metadata"]  # shown as the config instead


def test_inspect_reads_a_kohya_file(tmp_path):
    file = tmp_path / "style.safetensors"
    tensors = _kohya_file(file, tiny_unet(), rank=4, alpha=2.0)
    result = invoke("inspect", str(file))
    assert result.exit_code == 0, result.output
    te_part, unet_part = result.stdout.split("\n\n")  # components in name order
    assert te_part.startswith(f"Adapter 'text_encoder' at {file}\n")
    assert (
        "  format:     kohya LoRA file (lora_unet_... keys), component 'unet'; diffusers converts its keys"
        in unet_part
    )
    assert "  config:     none saved; read from the tensors:" in unet_part
    assert re.search(r"^    alpha\s+\[2\.0\]$", unet_part, re.M)
    report = json.loads(invoke("inspect", "--json", str(file)).stdout)
    entries = {entry["name"]: entry for entry in report["adapters"]}
    assert sorted(entries) == ["text_encoder", "unet"]
    assert entries["unet"]["config"] == {"r": [4], "alpha": [2.0]}
    assert entries["unet"]["parameters"] == sum(
        t.numel() for k, t in tensors.items() if k.startswith("lora_unet_")
    )


def test_inspect_file_without_lora_keys(tmp_path):
    file = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1)}, str(file))
    result = invoke("inspect", str(file))
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"Error: {str(file)!r} holds no LoRA tensors: diffusers' keys look like 'unet.<module>.lora_A.weight' (or "
        "'.lokr_w1'), kohya's like 'lora_unet_<module>.lora_down.weight'; its keys are: 'w'"
    )
    # a folder of other safetensors files is still no adapter folder
    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    folder_result = invoke("inspect", str(tmp_path))
    assert folder_result.stderr.strip() == (
        f"Error: {str(tmp_path)!r} has no adapter_config.json: it is not an adapter folder"
    )


def test_importing_peftkit_and_inspecting_do_not_import_diffusers(tmp_path):
    save_lora_weights(trained_lora("unet"), tmp_path)
    script = (
        "import sys, peftkit\n"
        "from peftkit.cli import main\n"
        f"try:\n    main(['inspect', {str(tmp_path)!r}])\n"
        "except SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
        "print('diffusers' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "False"
