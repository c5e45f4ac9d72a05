"""Tiny random Llama models and their tokenizers for tests, in one place.

`llama_config` gives the shared 2-layer, hidden-32 shape (every field can be overridden);
`save_tiny_llama` saves a seeded random model with its tokenizer as a model directory;
`smol_llama_dir` does so with the embedded SmolLM2 tokenizer (and so its chat template);
`tiny_tokenizer` and `tiny_model_dir` use a small BPE tokenizer trained on the demo data."""

from __future__ import annotations

from pathlib import Path

import torch

from sku_fast.unlearn.data import demo_data_path, load_qa_pairs

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def llama_config(tokenizer=None, **overrides):
    """A LlamaConfig: 2 layers, hidden 32, 4 heads, 2 key/value heads unless overridden; with a
    tokenizer, the vocabulary size and bos/eos/pad ids are taken from it."""
    from transformers import LlamaConfig

    values = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    if tokenizer is not None:
        values.update(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return LlamaConfig(**{**values, **overrides})


def save_tiny_llama(path: Path, tokenizer, *, seed: int | None = 0, **overrides) -> Path:
    """A randomly initialised Llama (`llama_config(tokenizer, **overrides)`, after
    `torch.manual_seed(seed)` unless seed is None) saved with its tokenizer into path."""
    from transformers import LlamaForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    LlamaForCausalLM(llama_config(tokenizer, **overrides)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def smol_llama_dir(path: Path, *, seed: int | None = 0, **overrides) -> Path:
    """`save_tiny_llama` with the embedded SmolLM2 tokenizer (and so its chat template)."""
    from sku_fast.unlearn.models import load_tokenizer

    return save_tiny_llama(path, load_tokenizer(None), seed=seed, **overrides)


def tiny_tokenizer(vocab: int = 300, chat: bool = False):
    """A byte-level BPE tokenizer trained on the demo data (pad = <pad>, eos = <eos>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for name in ("harmful", "normal"):
        texts += [text for p in load_qa_pairs(demo_data_path(name)) for text in p.__dict__.values()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<pad>", "<eos>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model_dir(path: Path, *, chat: bool = False, tied: bool = False, seed: int = 0) -> Path:
    """A randomly initialised 2-layer Llama (hidden 32) saved with its tokenizer (`tiny_tokenizer`,
    which has no bos token)."""
    return save_tiny_llama(
        path,
        tiny_tokenizer(chat=chat),
        seed=seed,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
    )
