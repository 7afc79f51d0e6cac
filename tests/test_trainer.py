"""transformers' Trainer with peftkit models: the plain Trainer, and PeftkitTrainer.

The plain ``transformers.Trainer`` trains a peftkit model as it trains a PEFT one (it reads the base
model's forward signature through ``PeftModel.forward``) and saves it whole, saying so once. With
PeftkitTrainer checkpoints hold the adapter only, resuming continues from the checkpoint's adapter, and
``load_best_model_at_end`` puts the best checkpoint's adapter back into the model.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peftkit import get_peft_model
from peftkit.errors import AdapterLoadError
from peftkit.testing.models import tiny_bert, tiny_llama, tiny_plain, tiny_t5
from safetensors.torch import load_file

# transformers' Trainer needs accelerate, which transformers does not install by itself
pytest.importorskip("accelerate", reason="transformers' Trainer needs the accelerate package")
import transformers  # noqa: E402
from peftkit.integrations.transformers import PeftkitTrainer, load_adapter_weights  # noqa: E402

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def lora_config(**overrides):
    from peftkit import LoraConfig

    settings = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    settings.update(overrides)
    return LoraConfig(**settings)


def causal_lm_data(count: int, seed: int = 1, length: int = 8) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (count, length), generator=generator)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def training_args(output_dir, **overrides):
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        learning_rate=0.05,
        max_steps=4,
        save_steps=2,
        save_strategy="steps",
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    from peftkit.serialization import adapter_state_dict

    return {key: value.clone() for key, value in adapter_state_dict(model, "default").items()}


def assert_same_tensors(actual, expected, atol=0.0):
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=atol, rtol=0, msg=key)


def test_checkpoints_hold_only_the_adapter(tmp_path):
    model = get_peft_model(tiny_llama(), lora_config())
    trainer = PeftkitTrainer(model=model, args=training_args(tmp_path), train_dataset=causal_lm_data(8))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))

    for folder in (tmp_path / "checkpoint-2", tmp_path / "checkpoint-4", tmp_path / "final"):
        names = {path.name for path in folder.iterdir()}
        assert ADAPTER_FILES <= names, folder
        assert not names & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}, folder
    saved = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    assert saved and all(".lora_" in key for key in saved)
    assert json.loads((tmp_path / "final" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # the final save is the trained adapter, and it moved away from its init (B starts at zero)
    assert_same_tensors(saved, adapter_tensors(model))
    assert any("lora_B" in key and value.abs().max() > 0 for key, value in saved.items())


def test_resuming_from_a_checkpoint_ends_with_the_uninterrupted_adapter(tmp_path):
    data = causal_lm_data(8)
    full = get_peft_model(tiny_llama(), lora_config())
    PeftkitTrainer(model=full, args=training_args(tmp_path / "full"), train_dataset=data).train()
    expected = adapter_tensors(full)

    resumed = get_peft_model(tiny_llama(), lora_config())
    before = adapter_tensors(resumed)  # a fresh adapter: resuming must replace it by the checkpoint's
    trainer = PeftkitTrainer(model=resumed, args=training_args(tmp_path / "resumed"), train_dataset=data)
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    actual = adapter_tensors(resumed)

    assert_same_tensors(actual, expected, atol=1e-6)
    assert any((actual[key] - before[key]).abs().max() > 1e-3 for key in before)
    assert trainer.state.global_step == 4


def test_resuming_without_the_adapter_in_the_checkpoint_says_so(tmp_path):
    model = get_peft_model(tiny_llama(), lora_config())
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(AdapterLoadError, match="holds no weights for the active adapter 'default'"):
        load_adapter_weights(model, tmp_path / "checkpoint-2")


def classification_data(count: int, seed: int = 2) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (count, 8), generator=generator)
    labels = torch.randint(0, 2, (count,), generator=generator)
    return [{"input_ids": row, "labels": label} for row, label in zip(ids, labels)]


def test_load_best_model_at_end_loads_the_best_checkpoints_adapter(tmp_path):
    config = lora_config(target_modules=["query", "value"], task_type="SEQ_CLS")
    model = get_peft_model(tiny_bert(), config)
    args = training_args(
        tmp_path,
        max_steps=6,
        eval_strategy="steps",
        eval_steps=2,
        learning_rate=0.5,  # large, so the adapters of the three checkpoints differ clearly
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=False,
    )
    data = classification_data(8)
    trainer = PeftkitTrainer(model=model, args=args, train_dataset=data, eval_dataset=data[:4])
    trainer.train()

    best = trainer.state.best_model_checkpoint
    assert best is not None
    checkpoints = sorted(tmp_path.glob("checkpoint-*"))
    assert len(checkpoints) == 3
    saved = {path.name: load_file(str(path / "adapter_model.safetensors")) for path in checkpoints}
    current = adapter_tensors(model)
    # the model now holds exactly the best checkpoint's adapter (the score head is saved with it) ...
    assert_same_tensors(current, saved[best.rsplit("/", 1)[-1]])
    # ... and the checkpoints differ from each other, so this would fail if another one were loaded
    others = [name for name in saved if name != best.rsplit("/", 1)[-1]]
    for name in others:
        assert any(not torch.equal(saved[name][key], current[key]) for key in current)
    # its evaluation loss is the best one logged
    losses = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    assert trainer.state.best_metric == min(losses)


def test_label_smoothing_shifts_the_labels_of_a_causal_lm(tmp_path):
    data = causal_lm_data(2)
    model = get_peft_model(tiny_llama(), lora_config())
    args = training_args(tmp_path, label_smoothing_factor=0.1)
    trainer = PeftkitTrainer(model=model, args=args, train_dataset=data)
    batch = trainer.data_collator(data)
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        logits = model(input_ids=batch["input_ids"]).logits
    # position i predicts token i + 1, as the model's own causal-LM loss has it
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), label_smoothing=0.1
    )
    torch.testing.assert_close(loss, expected)


# --- the plain transformers.Trainer ---------------------------------------------------------------


def with_a_text_column(rows: list[dict]) -> list[dict]:
    """Rows with a column no model takes: Trainer must drop it, or collating would fail on the strings."""
    return [{**row, "text": f"row {i}"} for i, row in enumerate(rows)]


def whole_model_notices(caught) -> list[str]:
    return [str(w.message) for w in caught if "PeftkitTrainer" in str(w.message)]


def adapter_moved(model) -> bool:
    return any("lora_B" in key and value.abs().max() > 0 for key, value in adapter_tensors(model).items())


def test_the_plain_trainer_trains_and_says_once_that_it_saves_the_whole_model(tmp_path):
    model = get_peft_model(tiny_llama(), lora_config())
    base_before = {key: value.clone() for key, value in model.state_dict().items() if ".lora_" not in key}
    trainer = transformers.Trainer(
        model=model, args=training_args(tmp_path), train_dataset=with_a_text_column(causal_lm_data(8))
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
        trainer.save_model(str(tmp_path / "final"))
        model.state_dict()  # the user's own calls stay quiet

    # three saves (checkpoint-2, checkpoint-4, final), one notice, at the first
    notices = whole_model_notices(caught)
    assert len(notices) == 1
    assert "model.safetensors" in notices[0] and "adapter_model.safetensors" in notices[0]
    assert adapter_moved(model)
    state = model.state_dict()
    assert all(torch.equal(state[key], value) for key, value in base_before.items())
    for folder in (tmp_path / "checkpoint-2", tmp_path / "checkpoint-4", tmp_path / "final"):
        names = {path.name for path in folder.iterdir()}
        assert "model.safetensors" in names and not names & ADAPTER_FILES, folder
    # what Trainer wrote is the whole model: base weights and the trained adapter
    assert_same_tensors(load_file(str(tmp_path / "final" / "model.safetensors")), state)


def test_peftkit_trainer_saves_without_the_notice(tmp_path):
    model = get_peft_model(tiny_llama(), lora_config())
    trainer = PeftkitTrainer(model=model, args=training_args(tmp_path), train_dataset=causal_lm_data(8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert whole_model_notices(caught) == []
    assert ADAPTER_FILES <= {path.name for path in (tmp_path / "checkpoint-2").iterdir()}


@pytest.mark.parametrize(
    "options", [{}, {"auto_find_batch_size": True}], ids=["default", "auto_find_batch_size"]
)
def test_the_plain_trainer_ends_with_the_adapter_peftkit_trainer_ends_with(tmp_path, options):
    data = causal_lm_data(8)
    plain = get_peft_model(tiny_llama(), lora_config())
    args = training_args(tmp_path / "plain", save_strategy="no", **options)
    transformers.Trainer(model=plain, args=args, train_dataset=with_a_text_column(data)).train()
    ours = get_peft_model(tiny_llama(), lora_config())
    PeftkitTrainer(
        model=ours, args=training_args(tmp_path / "ours", save_strategy="no"), train_dataset=data
    ).train()

    assert adapter_moved(plain)
    assert_same_tensors(adapter_tensors(plain), adapter_tensors(ours))


def test_the_plain_trainer_resumes_from_its_whole_model_checkpoint(tmp_path):
    data = causal_lm_data(8)
    full = get_peft_model(tiny_llama(), lora_config())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.Trainer(model=full, args=training_args(tmp_path / "full"), train_dataset=data).train()
        resumed = get_peft_model(tiny_llama(), lora_config())
        trainer = transformers.Trainer(
            model=resumed, args=training_args(tmp_path / "resumed"), train_dataset=data
        )
        trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    assert_same_tensors(adapter_tensors(resumed), adapter_tensors(full), atol=1e-6)


def test_gradient_accumulation_normalises_by_the_label_tokens_of_the_whole_batch(tmp_path):
    # rows with 7, 6, 4 and 1 predicted tokens: however two micro-batches of two split them, the mean of
    # their means differs from the mean over all tokens, so the two runs agree only if Trainer's
    # num_items_in_batch reaches the base model's loss through PeftModel.forward
    rows = causal_lm_data(4)
    for row, masked in zip(rows, (0, 1, 3, 6)):
        row["labels"][:masked] = -100

    def one_step(folder, batch_size, accumulation):
        model = get_peft_model(tiny_llama(), lora_config())
        args = training_args(
            folder,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            save_strategy="no",
            optim="sgd",
            learning_rate=1.0,
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
        assert trainer.model_accepts_loss_kwargs
        trainer.train()
        return adapter_tensors(model)

    whole = one_step(tmp_path / "whole", 4, 1)
    accumulated = one_step(tmp_path / "accumulated", 2, 2)
    assert any(value.abs().max() > 1e-3 for key, value in whole.items() if "lora_B" in key)
    assert_same_tensors(accumulated, whole, atol=1e-6)


def test_the_plain_trainer_reads_what_it_reads_from_a_model_as_from_the_base_model(tmp_path):
    for build, config in (
        (tiny_llama, lora_config()),
        (tiny_bert, lora_config(target_modules=["query", "value"], task_type="SEQ_CLS")),
        (tiny_plain, lora_config(target_modules=["fc1"])),  # its forward takes no **kwargs
    ):
        base_trainer = transformers.Trainer(model=build(), args=training_args(tmp_path))
        trainer = transformers.Trainer(model=get_peft_model(build(), config), args=training_args(tmp_path))
        assert trainer.model_accepts_loss_kwargs == base_trainer.model_accepts_loss_kwargs, build
        base_trainer._set_signature_columns_if_needed()
        trainer._set_signature_columns_if_needed()
        assert set(trainer._signature_columns) - set(base_trainer._signature_columns) <= {
            "adapter_names",
            "task_ids",  # a MultiTask composition's, kept as a dataset column
            "labels",
        }
        assert set(base_trainer._signature_columns) <= set(trainer._signature_columns)
    assert not transformers.Trainer(
        model=tiny_plain(), args=training_args(tmp_path)
    ).model_accepts_loss_kwargs


def test_the_plain_trainer_reports_the_evaluation_loss(tmp_path):
    """The loss Trainer reports for the base model alone (the fresh adapter changes no output). Not the
    model's own mean loss: transformers 4.57 divides the summed loss by all label tokens, shift aside."""
    model = get_peft_model(tiny_llama(), lora_config())
    data = causal_lm_data(4)
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path), eval_dataset=data)
    metrics = trainer.evaluate()
    base_trainer = transformers.Trainer(model=tiny_llama(), args=training_args(tmp_path), eval_dataset=data)
    expected = base_trainer.evaluate()["eval_loss"]
    if int(transformers.__version__.split(".")[0]) >= 5:
        ids = torch.stack([row["input_ids"] for row in data])
        with torch.no_grad():
            assert expected == pytest.approx(model(input_ids=ids, labels=ids).loss.item(), rel=1e-6)
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-6)


def tiny_tokenizer():
    """A word-level tokenizer over the tiny models' 128 ids, with [PAD] as id 0: what collators need."""
    from tokenizers import Tokenizer, models

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"t{i}": i for i in range(2, 128)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]"
    )


def ragged_rows(count: int, seed: int = 3) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (count,), generator=generator)
    return [{"input_ids": torch.randint(2, 128, (int(n),), generator=generator).tolist()} for n in lengths]


COLLATORS = ["DataCollatorWithPadding", "DataCollatorForLanguageModeling", "DataCollatorForSeq2Seq"]


@pytest.mark.parametrize("collator_name", COLLATORS)
def test_the_plain_trainer_with_transformers_data_collators(tmp_path, collator_name):
    tokenizer = tiny_tokenizer()
    rows = ragged_rows(8)
    if collator_name == "DataCollatorWithPadding":  # a classifier: labels are one per row
        model = get_peft_model(
            tiny_bert(), lora_config(target_modules=["query", "value"], task_type="SEQ_CLS")
        )
        rows = [{**row, "label": i % 2} for i, row in enumerate(rows)]
        collator = transformers.DataCollatorWithPadding(tokenizer)
    elif collator_name == "DataCollatorForLanguageModeling":  # a causal LM: labels are the padded inputs
        model = get_peft_model(tiny_llama(), lora_config())
        collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)
    else:  # an encoder-decoder: the collator asks the model for decoder inputs made from the labels
        model = get_peft_model(tiny_t5(), lora_config(target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"))
        rows = [{**row, "labels": list(reversed(row["input_ids"]))} for row in rows]
        collator = transformers.DataCollatorForSeq2Seq(tokenizer, model=model)
    args = training_args(tmp_path, save_strategy="no")
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=with_a_text_column(rows), data_collator=collator
    )
    trainer.train()
    assert adapter_moved(model)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_the_plain_trainer_with_bf16_autocast_follows_the_float32_run(tmp_path, dropout, monkeypatch):
    # transformers 4's TrainingArguments(bf16=True) sets ACCELERATE_MIXED_PRECISION for the whole process,
    # and later arguments without bf16 read it: the test starts without it and removes it when done
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    losses = {}
    for bf16 in (False, True):
        model = get_peft_model(tiny_llama(), lora_config(lora_dropout=dropout))
        args = training_args(
            tmp_path / str(bf16), bf16=bf16, save_strategy="no", logging_strategy="steps", logging_steps=1
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=causal_lm_data(8))
        trainer.train()
        assert trainer.accelerator.mixed_precision == ("bf16" if bf16 else "no")
        assert adapter_moved(model)
        losses[bf16] = torch.tensor([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
    assert len(losses[True]) == 4
    # bf16 keeps 8 bits of mantissa (relative rounding 2**-8 per operation): the losses agree to 1%
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-2, atol=0)
