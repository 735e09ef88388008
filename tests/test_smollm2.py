"""Integration tests on the real embedded SmolLM2-135M-Instruct (bf16, CPU)."""

import torch

from extensible import EmbedderConfig, ExtensibleEmbedder, ExtensibleLM, IncompatiblePluginError
from extensible.models import cache_dir
from extensible.text import chat_tokens, tokenize
from jobs.cli import main
from pipeline.corpus import pydoc_topics

import pytest


@pytest.fixture(scope="module")
def real_lm(smollm2):
    llm, tokenizer = smollm2
    embedder = ExtensibleEmbedder.from_llm(llm, tokenizer, EmbedderConfig(num_layers=8, chunk_size=256))
    return ExtensibleLM(llm, tokenizer, embedder, window=512)


@pytest.fixture(scope="module")
def document(smollm2):
    _, tokenizer = smollm2
    return tokenize(tokenizer, pydoc_topics()["compound"])[:2000]


def test_the_embedded_default_loads_frozen_from_a_plain_cached_checkpoint(smollm2):
    llm, tokenizer = smollm2
    assert llm.config.model_type == "llama" and llm.config.num_hidden_layers == 30 and llm.config.hidden_size == 576
    assert llm.dtype == torch.bfloat16 and not llm.training
    assert not any(p.requires_grad for p in llm.parameters())
    cached = cache_dir() / "models"
    assert (cached / "SmolLM2-135M-Instruct-bf16" / "model.safetensors").exists()
    left = [p.name for p in cached.iterdir() if p.suffix != ".lock"]  # the conversion's lock file stays, empty
    assert left == ["SmolLM2-135M-Instruct-bf16"], "no half-written conversion left"
    assert "quantization_config" not in (cached / "SmolLM2-135M-Instruct-bf16" / "config.json").read_text()
    assert tokenizer.chat_template and len(tokenizer) == 49152


def test_no_compression_gives_the_plain_llm_logits(real_lm, document):
    ids = document[:500]
    score = real_lm.score(ids, 100, k=8)
    with torch.no_grad():
        logprobs = torch.log_softmax(real_lm.llm(ids[None]).logits[0].float(), -1)
    assert torch.equal(score.token_nll, -logprobs[399:499].gather(1, ids[400:500, None])[:, 0])


def test_offline_equals_online_and_streaming_on_the_real_model(real_lm, document):
    full = real_lm.encode(document)
    assert full.shape == (2000, 576)
    for k in (8, 16):
        offline = real_lm.score(document, 256, k, full=full)
        assert torch.equal(offline.token_nll, real_lm.score(document, 256, k).token_nll)
        session = real_lm.stream(k, block=128)
        streamed = -torch.cat([session.feed(document[i : i + 300]) for i in range(0, 2000, 300)])[-256:]
        # bf16: a KV-cached forward rounds differently from a full one; the per-token NLLs agree closely.
        assert (streamed - offline.token_nll).abs().mean() < 0.05
        assert abs(streamed.mean() - offline.token_nll.mean()) < 0.02


def test_a_plugin_for_smollm2_refuses_another_llm(real_lm, tiny, tmp_path):
    real_lm.embedder.save_pretrained(tmp_path)
    llm, tokenizer = tiny
    with pytest.raises(IncompatiblePluginError, match="hidden_size: plug-in 576 vs LLM 64"):
        ExtensibleEmbedder.from_pretrained(tmp_path, llm, tokenizer)


def test_generate_answers_a_question_about_a_long_document(real_lm, smollm2):
    _, tokenizer = smollm2
    topics = pydoc_topics()
    ids = chat_tokens(tokenizer, topics["compound"][:9000], "What keyword starts a loop over the items of a sequence?")
    assert real_lm.layout(8).compressed_chunks(len(ids)) > 0
    answer = tokenizer.decode(real_lm.generate(ids, 8, max_new_tokens=24), skip_special_tokens=True)
    assert len(answer.split()) >= 2


def test_cli_ppl_on_the_real_model(tmp_path, capsys):
    path = tmp_path / "doc.txt"
    path.write_text(pydoc_topics()["specialnames"][:20000])
    assert main(["ppl", str(path), "--k", "8", "--window", "512", "--tail", "128", "--context", "2048", "--chunk", "256", "--untrained"]) == 0
    out = capsys.readouterr().out
    assert "window" in out and "ext:8" in out and "given 2048 tokens of context" in out


def test_the_shipped_plugin_is_the_default_and_small(smollm2):
    from extensible.plugins import SHIPPED, load_embedder

    llm, tokenizer = smollm2
    embedder = load_embedder(llm, tokenizer)
    assert embedder.config.trained_steps > 0 and embedder.config.lora_rank  # trained, not a fresh copy
    files = list((SHIPPED / "smollm2-135m-instruct").iterdir())
    assert {f.name for f in files} >= {"extensible_config.json", "embedder.safetensors", "README.md"}
    assert sum(f.stat().st_size for f in files) < 20 * 2**20
    fresh = ExtensibleEmbedder.from_llm(llm, tokenizer, EmbedderConfig(chunk_size=embedder.config.chunk_size))
    ids = tokenize(tokenizer, pydoc_topics()["with"])[None, :256]
    assert not torch.allclose(embedder(ids).float(), fresh(ids).float(), atol=1e-3)  # the trained tensors are loaded
