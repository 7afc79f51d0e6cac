"""TRL's DPO and GRPO trainers with peftkit models: the model itself is the reference, never a copy of it.

TRL keeps no reference model for PEFT's models: it computes the reference log-probabilities from the model
with its adapters disabled (a new adapter), or with a frozen copy of the adapter it was given, named "ref"
(an adapter trained already). Any other model gets a second copy of the base model.
``peftkit.integrations.trl.DPOTrainer`` and ``GRPOTrainer`` give peftkit models the first route. The
tests compare the reference values with those of an independent base model (same weights, no adapters),
and count the storages of every ``nn.Parameter`` alive in the process: a copy of the model, wherever it
were kept, would add its own.
"""

from __future__ import annotations

import gc

import pytest
import torch
import trl
from datasets import Dataset
from peftkit import LoraConfig, get_peft_model
from peftkit.integrations.trl import DPOTrainer, GRPOTrainer
from peftkit.serialization import adapter_state_dict
from peftkit.testing.models import randomize_trainable, tiny_llama
from peftkit.testing.tokenizers import word_level_tokenizer
from torch._subclasses.fake_tensor import is_fake

WORDS = "the sky sea grass sun ice fire is are blue green yellow red cold hot wet dry and".split()
COLOURS = {"blue", "green", "yellow", "red"}

PREFERENCES = {
    "prompt": ["the sky is", "the grass is", "the sun is", "ice is", "fire is", "the sea is"],
    "chosen": [" blue", " green", " yellow", " cold", " hot", " wet"],
    "rejected": [" green", " red", " cold", " hot", " cold", " dry"],
}


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer over WORDS, built here (no download); pad is id 0 as in tiny_llama."""
    return word_level_tokenizer(WORDS, eos="<eos>")


def base_model():
    """The same tiny Llama on every call (seeded), so a second call is an independent base to compare with."""
    return tiny_llama(seed=0, vocab_size=len(WORDS) + 3)


def lora_config():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def parameter_storages() -> dict[int, int]:
    """Every nn.Parameter with real memory alive in the process: its storage's address and size in bytes.

    Tensors without memory are left out: meta tensors, and the fake tensors that torch.compile's tracing
    leaves behind in a process that ran compile tests before (their storage has no address)."""
    gc.collect()
    return {
        obj.untyped_storage().data_ptr(): obj.untyped_storage().nbytes()
        for obj in gc.get_objects()
        if isinstance(obj, torch.nn.Parameter) and _has_memory(obj)
    }


def _has_memory(tensor: torch.Tensor) -> bool:
    if tensor.is_meta or is_fake(tensor):
        return False
    try:
        tensor.untyped_storage().data_ptr()
    except RuntimeError:  # a tensor subclass without storage (FunctionalTensor...)
        return False
    return True


def adapter_storages(model, adapter_name: str) -> set[int]:
    return {
        param.untyped_storage().data_ptr()
        for _, layer in model.adapter_layers()
        for _, param in layer.adapter_parameters(adapter_name)
    }


def adapter_tensors(model, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in adapter_state_dict(model, adapter_name).items()}


def common_args(tmp_path, **overrides) -> dict:
    settings = dict(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=0.05,
        bf16=False,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return settings


# --- DPO -------------------------------------------------------------------------------------------------


def dpo_trainer(tmp_path, tokenizer, model, **kwargs):
    args = trl.DPOConfig(**common_args(tmp_path, **kwargs.pop("args", {})))
    data = Dataset.from_dict(PREFERENCES)
    return DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, **kwargs)


def preference_batch(trainer) -> dict[str, torch.Tensor]:
    """Four preference pairs as the trainer batches them: chosen rows, then rejected rows."""
    features = [trainer.train_dataset[i] for i in range(4)]
    return trainer._prepare_inputs(trainer.data_collator(features))


@torch.no_grad()
def completion_logps(model, batch) -> torch.Tensor:
    """Each row's summed log-probability of its completion tokens, from the model's ordinary logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["input_ids"][:, 1:]
    token_logps = logits.float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return (token_logps * batch["completion_mask"][:, 1:]).sum(dim=1)


def test_dpo_new_adapter_uses_the_model_with_adapters_disabled_as_reference(tmp_path, tokenizer):
    base = base_model()
    before = parameter_storages()
    trainer = dpo_trainer(tmp_path, tokenizer, base, peft_config=lora_config())
    model = trainer.model
    built = parameter_storages()

    # no reference model, no "ref" adapter: the only parameters added are the new adapter's
    assert trainer.ref_model is None
    assert list(model.peft_config) == ["default"]
    assert set(before) <= set(built)
    assert set(built) - set(before) == adapter_storages(model, "default")

    randomize_trainable(model)  # the policy now differs from the base model
    batch = preference_batch(trainer)
    independent_base = base_model()
    expected = completion_logps(independent_base, batch)
    policy = completion_logps(model, batch)
    assert (policy - expected).abs().max() > 1e-3  # so that the reference could not pass for the policy

    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(model, batch)
    torch.testing.assert_close(torch.cat([ref_chosen, ref_rejected]), expected, atol=1e-5, rtol=1e-5)

    # the training loss uses the same reference: DPO's sigmoid loss from the policy and the base model
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
    chosen, rejected = policy.chunk(2)
    base_chosen, base_rejected = expected.chunk(2)
    margin = (chosen - base_chosen) - (rejected - base_rejected)
    expected_loss = -torch.nn.functional.logsigmoid(trainer.beta * margin).mean()
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)

    del independent_base
    start = adapter_tensors(model)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(start[key], value) for key, value in adapter_tensors(model).items())
    # after steps (optimizer state exists now, gradients were taken) still no parameter has been added
    assert parameter_storages().keys() == built.keys()
    assert trainer.ref_model is None


def test_dpo_keeps_a_frozen_copy_of_a_trained_adapter_as_reference(tmp_path, tokenizer):
    # a model whose adapter is trained already (after SFT, say): the reference is that adapter, as it was
    model = randomize_trainable(get_peft_model(base_model(), lora_config()))
    before = parameter_storages()
    trainer = dpo_trainer(
        tmp_path,
        tokenizer,
        model,
        args=dict(save_strategy="steps", save_steps=2, gradient_checkpointing=True),
    )
    built = parameter_storages()

    assert trainer.ref_model is None
    assert list(model.peft_config) == ["default", "ref"]
    # the copy is of the adapter alone: the base model's parameters are where they were, and not copied
    assert set(before) <= set(built)
    assert set(built) - set(before) == adapter_storages(model, "ref")
    assert adapter_tensors(model, "ref").keys() == adapter_tensors(model).keys()
    # TRL enables the embeddings' gradients for gradient checkpointing; the trainer does not add a second hook
    assert len(model.get_input_embeddings()._forward_hooks) == 1

    batch = preference_batch(trainer)
    start_policy = completion_logps(model, batch)
    start = adapter_tensors(model)
    trainer.train()
    assert any(not torch.equal(start[key], value) for key, value in adapter_tensors(model).items())
    assert all(torch.equal(start[key], value) for key, value in adapter_tensors(model, "ref").items())
    assert model.active_adapters == ["default"]
    assert not any(param.requires_grad for name, param in model.named_parameters() if ".ref." in name)

    # the reference is the adapter as it was given, not the trained one, nor the base model
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(model, batch)
    torch.testing.assert_close(torch.cat([ref_chosen, ref_rejected]), start_policy, atol=1e-5, rtol=1e-5)
    assert (completion_logps(model, batch) - start_policy).abs().max() > 1e-4
    assert parameter_storages().keys() == built.keys()

    # checkpoints hold adapters only ("ref" in its sub-folder, as PEFT saves a second adapter)
    checkpoint = tmp_path / "checkpoint-2"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    assert not (checkpoint / "model.safetensors").exists()
    assert (checkpoint / "ref" / "adapter_model.safetensors").is_file()


def test_dpo_refuses_to_sync_a_reference_it_does_not_have(tmp_path, tokenizer):
    with pytest.raises(NotImplementedError, match="sync_ref_model=True.*PEFT model"):
        dpo_trainer(
            tmp_path, tokenizer, base_model(), peft_config=lora_config(), args=dict(sync_ref_model=True)
        )


def test_dpo_refuses_an_adapter_on_the_lm_head(tmp_path, tokenizer):
    config = LoraConfig(r=4, target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="adapter on the LM head .* would never train.*target_modules"):
        dpo_trainer(tmp_path, tokenizer, base_model(), peft_config=config)


def test_dpo_says_which_adapter_it_copies_as_reference(tmp_path, tokenizer):
    model = get_peft_model(base_model(), lora_config(), adapter_name="policy")
    with pytest.raises(ValueError, match=r"adapter named 'default'.*\['policy'\].*or pass ref_model"):
        dpo_trainer(tmp_path, tokenizer, model)
    model.add_adapter("default", lora_config())
    model.add_adapter("ref", lora_config())
    with pytest.raises(ValueError, match=r"adds an adapter named 'ref'.*has one already.*delete_adapter"):
        dpo_trainer(tmp_path, tokenizer, model)


# --- GRPO ------------------------------------------------------------------------------------------------


def colour_words(completions, **_) -> list[float]:
    """A toy reward: how many colour words the completion has."""
    return [float(sum(word in COLOURS for word in text.split())) for text in completions]


def grpo_trainer(tmp_path, tokenizer, model, **kwargs):
    settings = common_args(tmp_path, num_generations=4, max_completion_length=4, beta=0.1)
    settings.update(kwargs.pop("args", {}))
    data = Dataset.from_dict({"prompt": PREFERENCES["prompt"][:4] * 2})
    return GRPOTrainer(
        model=model,
        reward_funcs=colour_words,
        args=trl.GRPOConfig(**settings),
        train_dataset=data,
        processing_class=tokenizer,
        **kwargs,
    )


@torch.no_grad()
def completion_token_logps(model, prompt_ids, prompt_mask, completion_ids) -> torch.Tensor:
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, torch.ones_like(completion_ids)], dim=1)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, prompt_ids.size(1) - 1 : -1]
    return logits.float().log_softmax(-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)


def test_grpo_with_beta_uses_the_model_with_adapters_disabled_as_reference(tmp_path, tokenizer):
    base = base_model()
    before = parameter_storages()
    trainer = grpo_trainer(tmp_path, tokenizer, base, peft_config=lora_config())
    model = trainer.model
    built = parameter_storages()
    assert trainer.ref_model is None
    assert list(model.peft_config) == ["default"]
    assert set(built) - set(before) == adapter_storages(model, "default")

    randomize_trainable(model)  # the policy differs from the reference: the KL term is not zero
    generated = []
    generate_and_score = trainer._generate_and_score_completions

    def recording(inputs):
        output = generate_and_score(inputs)
        generated.append(
            {key: value.detach().clone() for key, value in output.items() if torch.is_tensor(value)}
        )
        return output

    trainer._generate_and_score_completions = recording
    start = adapter_tensors(model)
    trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    kls = [entry["kl"] for entry in trainer.state.log_history if "kl" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses + kls)))
    assert all(kl > 0 for kl in kls)
    assert any(not torch.equal(start[key], value) for key, value in adapter_tensors(model).items())
    assert parameter_storages().keys() == built.keys()

    independent_base = base_model()
    assert generated
    for output in generated:
        expected = completion_token_logps(
            independent_base, output["prompt_ids"], output["prompt_mask"], output["completion_ids"]
        )
        completion = output["completion_mask"].bool()
        torch.testing.assert_close(
            output["ref_per_token_logps"][completion], expected[completion], atol=1e-5, rtol=1e-5
        )


def test_grpo_given_model_reference_follows_beta(tmp_path, tokenizer):
    # beta=0 (TRL's default): no reference at all
    model = get_peft_model(base_model(), lora_config())
    before = parameter_storages()
    trainer = grpo_trainer(tmp_path, tokenizer, model, args=dict(beta=0.0, max_steps=1))
    assert trainer.ref_model is None
    assert list(model.peft_config) == ["default"]
    trainer.train()
    assert parameter_storages().keys() == before.keys()
    assert [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    # beta>0: a frozen copy of the given adapter is the reference, and only the adapter is copied
    model = get_peft_model(base_model(), lora_config())
    before = parameter_storages()
    trainer = grpo_trainer(tmp_path, tokenizer, model)
    assert trainer.ref_model is None
    assert list(model.peft_config) == ["default", "ref"]
    assert set(parameter_storages()) - set(before) == adapter_storages(model, "ref")
