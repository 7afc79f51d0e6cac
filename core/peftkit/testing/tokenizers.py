"""A tokenizer built on the spot for tests and examples with tiny models: no download, a known vocabulary."""

from __future__ import annotations

from collections.abc import Iterable


def word_level_tokenizer(texts: Iterable[str], pad: str = "<pad>", unk: str = "<unk>", eos: str = "</s>"):
    """A whitespace word-level tokenizer over the words of ``texts``: ids 0, 1 and 2 are ``pad``, ``unk`` and
    ``eos`` (``tiny_llama``'s pad token id is 0), then the words in sorted order. ``len(tokenizer)`` is the
    vocabulary size to give the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({word for text in texts for word in text.split()} - {pad, unk, eos})
    vocab = {token: index for index, token in enumerate([pad, unk, eos, *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=pad, unk_token=unk, eos_token=eos)
