"""Integration tests on the real embedded SmolLM2-135M-Instruct (stored bf16, run in fp32 on the CPU)."""

import re

import torch

from extensible import EmbedderConfig, ExtensibleEmbedder, ExtensibleLM, IncompatiblePluginError
from extensible.models import cache_dir
from extensible.text import chat_tokens, tokenize
from jobs.cli import main
from pipeline.corpus import pydoc_topics
from rag.library import InMemoryDocument, build_query, prompt_parts

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
    assert llm.dtype == torch.float32 and not llm.training  # bf16 on disk; fp32 on a CPU (see load_llm)
    assert not any(p.requires_grad for p in llm.parameters())
    cached = cache_dir() / "models"
    assert (cached / "SmolLM2-135M-Instruct-bf16" / "model.safetensors").exists()
    left = [p.name for p in cached.iterdir() if p.suffix != ".lock"]  # the conversion's lock file stays, empty
    assert left == ["SmolLM2-135M-Instruct-bf16"], "no half-written conversion left"
    assert "quantization_config" not in (cached / "SmolLM2-135M-Instruct-bf16" / "config.json").read_text()
    assert tokenizer.chat_template and len(tokenizer) == 49152


def test_no_compression_gives_the_plain_llm_logits(real_lm, document):
    ids = document[:500]
    score = real_lm.score(ids, 100, k=8).token_nll
    targets = ids[400:500, None]
    with torch.no_grad():
        # The plain LLM on the very input scoring runs (499 tokens, the last 100 logits kept): the same computation,
        # so bit for bit the same NLLs.
        same = real_lm.llm(ids[None, :499], logits_to_keep=100).logits[0]
        # The plain LLM as one usually runs it: all 500 positions, every logit. Differently shaped bf16 matmuls may
        # round differently on another CPU (3.8e-6 seen); another attention kernel (eager vs SDPA) moves a token's
        # NLL by up to 0.18 here, while compressing even one chunk moves some by over 1.
        whole = real_lm.llm(ids[None]).logits[0, 399:499]
    assert torch.equal(score, -torch.log_softmax(same.float(), -1).gather(1, targets)[:, 0])
    torch.testing.assert_close(score, -torch.log_softmax(whole.float(), -1).gather(1, targets)[:, 0], atol=0.25, rtol=0)


def test_offline_equals_online_and_streaming_on_the_real_model(real_lm, document, monkeypatch):
    # One chunk per embedder call, offline and online alike: the same matmul shapes, so the same bits (batching
    # chunks differently is a different bf16 computation, which may round differently).
    monkeypatch.setattr(real_lm, "encode_batch", 1)
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
    opening, ids = chat_tokens(tokenizer, topics["compound"][:9000], "What keyword starts a loop over the items of a sequence?")
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert opening[0] == start and start not in ids[:50].tolist()  # the template's opening is read raw, not compressed
    assert real_lm.layout(8, len(opening)).compressed_chunks(len(ids)) > 0
    new = real_lm.generate(ids, 8, max_new_tokens=16, prefix=opening)
    assert real_lm.generate(ids, 8, max_new_tokens=16, prefix=opening) == new  # greedy: the same input, the same answer
    answer = tokenizer.decode(new, skip_special_tokens=True)
    assert re.search(r"[\"'`]for[\"'`]", answer), answer  # names the keyword the document's `for` section gives


def test_the_prompt_parts_follow_smollm2s_chat_template(smollm2):
    _, tokenizer = smollm2
    question = "What keyword starts a loop?"
    before, after = prompt_parts(tokenizer, f"  {question}\n")
    ids_of = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    # Before the documents: the system turn, then the user turn opened; after them: the question, the user turn
    # closed and the assistant's turn opened, so the model answers next.
    user, assistant = [start, *ids_of("user\n")], [start, *ids_of("assistant\n")]
    assert before[:2] == [start, *ids_of("system")] and before[-len(user):] == user
    assert after == ids_of(question) + [tokenizer.convert_tokens_to_ids("<|im_end|>"), *ids_of("\n")] + assistant
    template = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"]
    assert before + after == template  # no documents: exactly the model's own template


def test_a_compressed_query_is_the_template_the_rows_and_the_question(real_lm, smollm2, document):
    _, tokenizer = smollm2
    ids, size = document[:1792], real_lm.chunk_size  # 7 whole chunks
    full = real_lm.encode(ids)
    question = "What keyword starts a loop over the items of a sequence?"
    query = build_query(real_lm, question, [InMemoryDocument(full, size)], [{3: 1.0, 4: 0.5}], ["compound"], [ids],
                        strategy="hybrid", answer_tokens=16)
    ks = query.chunk_ks[0]
    assert ks[3] == 1 and max(ks.values()) > 1 and query.positions + 16 <= real_lm.window  # raw and compressed
    # By hand: the model's template split where the question starts; the document inside the user turn, before it.
    template = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"]
    ids_of = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    asked = ids_of(question)
    cut = next(i for i in range(len(template)) if template[i : i + len(asked)] == asked)
    embed = lambda token_ids: real_lm.llm.get_input_embeddings()(torch.as_tensor(token_ids))  # noqa: E731
    assert real_lm.method == "strided"  # chunk c at k: its outputs o_k, o_2k, ...
    rows = [embed(ids[c * size : (c + 1) * size]) if k == 1 else full[c * size + k - 1 : (c + 1) * size : k]
            for c, k in sorted(ks.items())]  # the document's chunks in order
    by_hand = torch.cat([embed(template[:cut]), embed(ids_of("Document 1 (compound):\n")), *rows,
                         embed(ids_of("\n\n")), embed(template[cut:])])
    assert torch.equal(query.embeds[0], by_hand)


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
    assert embedder.config.row_base == "token" and embedder.config.row_mlp  # the read stage's, whose rows carry content
    files = list((SHIPPED / "smollm2-135m-instruct").iterdir())
    assert {f.name for f in files} >= {"extensible_config.json", "embedder.safetensors", "README.md"}
    assert sum(f.stat().st_size for f in files) < 20 * 2**20
    fresh = ExtensibleEmbedder.from_llm(llm, tokenizer, EmbedderConfig(chunk_size=embedder.config.chunk_size))
    ids = tokenize(tokenizer, pydoc_topics()["with"])[None, :256]
    assert not torch.allclose(embedder(ids).float(), fresh(ids).float(), atol=1e-3)  # the trained tensors are loaded
