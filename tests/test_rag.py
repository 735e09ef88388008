"""The RAG layer on a tiny random Llama store with the real all-MiniLM-L6-v2: planning k, reading only the planned
rows, the passage index (and its staleness), answers, LangChain, the CLI, and the QA metrics/evaluation."""

import copy
import json
import re
import shutil

import numpy as np
import pytest
import torch
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from extensible import UserError
from extensible.downscale import downscale_chunk, num_kept
from extensible.errors import ContextTooLongError
from extensible.plugins import load_extensible
from jobs.cli import build_parser, main
from pipeline.precompute import precompute
from rag.index import PassageIndex, build_index
from rag.langchain import ChatExtensible, ExtensibleLLM, StoreRetriever
from rag.library import InMemoryDocument, Library, build_query, generate_answer
from rag.library import Prompt
from rag.plan import DEFAULT_STRATEGY, Unit, plan
from rag.qa_eval import (EvalDocument, ForeignRows, QAEvaluation, answer_chunks, answer_read, choose_donors,
                         evaluate_qa, exact_match, paired_differences, parse_qa_methods, qa_markdown, read_leval,
                         rouge_l, spread_questions, summarise, task_names, token_f1)
from storage.store import Store

from .conftest import save_tiny

FILLER = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
TOPICS = {
    "volcano": "The volcano erupted and red lava and hot magma flowed down the mountain into the burning forest.",
    "bank": "The bank raised the interest rate on loans and mortgages, and savers moved their deposits.",
    "football": "The football team scored a late goal and the fans in the stadium cheered for the striker.",
}


def document(seed: int, topic: str) -> str:
    words = " ".join(np.random.default_rng(seed).choice(FILLER, 300))
    return f"{words}\n{TOPICS[topic]}\n{words[:400]}\n"


def letters(seed: int, n: int = 1500) -> str:
    """Random letters: under the character tokenizer, a text sharing no 8-gram with ``document``'s (whose filler
    words make every two of them share most 8-grams) -- a donor for the foreign controls."""
    return "".join(np.random.default_rng(seed).choice(list("abcdefghijklmnopqrstuvwxyz  "), n))


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("tiny8-rag"), layers=8))


@pytest.fixture(scope="module")
def built(tiny8, tmp_path_factory):
    """A store of three documents with a minilm index, built once by the real Ray job."""
    root = tmp_path_factory.mktemp("rag")
    corpus = root / "corpus"
    corpus.mkdir()
    for seed, topic in enumerate(TOPICS):
        (corpus / f"{topic}.txt").write_text(document(seed, topic))
    precompute(str(corpus), str(root / "store"), model=tiny8, chunk_size=16, progress=False)
    build_index(Store.open(root / "store"), "minilm", progress=False)
    return root


@pytest.fixture
def store_path(built, tmp_path):
    shutil.copytree(built / "store", tmp_path / "store")
    return tmp_path / "store"


@pytest.fixture(scope="module")
def lm(tiny8):
    return load_extensible(tiny8, chunk_size=16, window=256)


# ---- planning k ---------------------------------------------------------------------------------------------------


def units(lengths, hits=None):
    hits = hits or {}
    return [Unit(0, i, n, hits.get(i, float("-inf"))) for i, n in enumerate(lengths)]


def test_adaptive_plan_is_the_smallest_k_that_fits():
    chunks = units([16] * 10 + [5])
    for budget in (11, 30, 45, 80, 200):
        result = plan(chunks, 1, budget, "adaptive", max_k=16)
        k = result.ks[0][0]
        assert set(result.ks[0].values()) == {k} and len(result.ks[0]) == 11
        assert result.slots(chunks) <= budget
        if k > 1:  # one k finer would not fit
            assert sum(num_kept(u.length, k - 1) for u in chunks) > budget


def test_graded_plan_refines_the_best_chunk_to_raw_before_the_next():
    chunks = units([16] * 12, hits={3: 0.9, 7: 0.5})
    result = plan(chunks, 1, 40, "graded", max_k=16, min_k=1)
    ks = result.ks[0]
    assert result.slots(chunks) <= 40 and len(ks) == 12
    assert ks[3] == 1 and 1 < ks[7] < 16  # the best passage raw; the second as fine as what is left allows
    assert all(ks[7] <= k for c, k in ks.items() if c not in (3, 7))
    adaptive = plan(chunks, 1, 40, "adaptive", max_k=16).ks[0]
    assert ks[3] < adaptive[3]  # the best passage gets more slots than a uniform k gives it


def test_graded_plan_keeps_room_to_read_the_best_chunk_raw_when_the_document_overflows_at_max_k():
    chunks = units([16] * 100, hits={50: 0.9, 10: 0.5})  # 100 slots at max_k: more than the 40 of the budget
    result = plan(chunks, 1, 40, "graded", max_k=16, min_k=1)
    ks = result.ks[0]
    assert result.slots(chunks) <= 40 and ks[50] == 1 and 1 < ks[10] < 16
    assert sum(k == 16 for k in ks.values()) == 18  # the compressed took half the budget: 20 chunks, 2 refined
    assert plan(units([16] * 3), 1, 1, "graded", max_k=16).ks[0] == {2: 16}  # no half of one slot: the whole one


def test_rag_plan_reads_the_most_relevant_chunks_raw_and_hybrid_adds_the_rest_compressed():
    chunks = units([16] * 10, hits={7: 0.9, 2: 0.8, 5: 0.1})
    rag = plan(chunks, 1, 40, "rag", max_k=16).ks[0]
    assert rag == {2: 1, 7: 1}  # the two best fit; the third (16 more) does not; document order
    hybrid = plan(chunks, 1, 40, "hybrid", max_k=16)
    ks = hybrid.ks[0]
    assert hybrid.raw_chunks(0) == [2, 7]  # exactly what rag reads raw
    assert len(ks) == 10 and all(k == 16 for c, k in ks.items() if c not in (2, 7)) and hybrid.slots(chunks) == 40
    tight = plan(chunks, 1, 35, "hybrid", max_k=16).ks[0]  # 3 slots left: the three most relevant of the rest
    assert {c for c, k in tight.items() if k == 16} == {5, 9, 8}
    assert plan(units([16] * 3), 1, 100, "hybrid").ks[0] == {0: 1, 1: 1, 2: 1}  # a document that fits is read raw
    assert plan(chunks, 1, 40, "rag:4", max_k=2).ks[0] == {2: 4, 7: 4}  # rag's chunks, all at k=4 (max_k aside)
    assert plan(chunks, 1, 40, max_k=16).ks[0] == plan(chunks, 1, 40, "graded", max_k=16).ks[0]  # the default
    for bad in ("rag:1", "rag:x", "hybrid:4"):
        with pytest.raises(UserError, match="rag:K|unknown strategy"):
            plan(chunks, 1, 40, bad)


def test_plan_leaves_out_the_least_relevant_chunks_when_even_max_k_overflows():
    chunks = units([16] * 10, hits={2: 0.8})
    result = plan(chunks, 1, 4, "adaptive", max_k=16)
    assert len(result.ks[0]) == 4 and 2 in result.ks[0] and 9 in result.ks[0]  # the hit, then the most recent
    with pytest.raises(ContextTooLongError, match="fill the window"):
        plan(chunks, 1, 0)
    with pytest.raises(UserError, match="unknown strategy"):
        plan(chunks, 1, 10, "uniform")


# ---- reading only the planned rows -------------------------------------------------------------------------------


def test_a_lazy_document_encodes_a_reads_chunks_in_bounded_batches(tiny_lm):
    ids = [3 + i % 90 for i in range(16 * 7 + 5)]  # 7 whole chunks and a partial one
    batches = []
    hook = tiny_lm.embedder.register_forward_hook(lambda module, args, output: batches.append(len(args[0])))
    try:
        document = InMemoryDocument.lazy(ids, 16, tiny_lm.embedder, encode_batch=3)
        with torch.no_grad():
            read = document.downscaled_chunks({c: 4 for c in range(8)})
    finally:
        hook.remove()
    assert batches == [3, 3, 1, 1]  # the 7 whole chunks 3 at a time, then the partial one
    with torch.no_grad():
        expected = tiny_lm.encode(ids)
    for chunk in range(8):
        assert torch.allclose(read[chunk], downscale_chunk(expected[16 * chunk : 16 * (chunk + 1)], 4, "strided", 0,
                                                           chunk), atol=1e-5)


@pytest.mark.parametrize("method", ["strided", "random", "terminal", "mean"])
def test_downscaled_chunks_read_from_zarr_match_the_in_memory_outputs(store_path, method):
    stored = Store.open(store_path).documents()[0]
    full = torch.from_numpy(stored.read().astype(np.float32))
    last = stored.num_chunks - 1
    ks = {0: 4, 3: 16, 5: 1, last: 3}  # the last chunk is partial
    from_store = stored.downscaled_chunks(ks, method, seed=7)
    in_memory = InMemoryDocument(full, stored.chunk_size).downscaled_chunks(ks, method, seed=7)
    for chunk, k in ks.items():
        assert len(from_store[chunk]) == num_kept(stored.chunk_length(chunk), k)
        assert torch.allclose(torch.from_numpy(from_store[chunk].astype(np.float32)), in_memory[chunk], atol=1e-3)
    expected = downscale_chunk(full[16 * 3 : 16 * 4], 16, method, 7, 3)
    assert torch.allclose(torch.from_numpy(from_store[3].astype(np.float32)), expected, atol=1e-3)


# ---- the passage index -------------------------------------------------------------------------------------------


def test_minilm_index_finds_the_document_on_the_topic(store_path, lm):
    library = Library(store_path, lm=lm)
    for topic, question in [("volcano", "Where did the lava from the eruption go?"),
                            ("bank", "What happened to mortgage interest rates?")]:
        best = library.search(question, documents=1)[0]
        assert best.source.endswith(f"{topic}.txt")
        assert best.passages[0]["text"].strip(" \n") in f"\n{TOPICS[topic]}\n"  # a 16-character piece of the topic


def test_embedder_mean_index_is_built_from_the_stored_outputs(store_path, lm):
    assert build_index(Store.open(store_path), "embedder-mean", progress=False) == f"{store_path}/index/embedder-mean"
    meta = json.loads((store_path / "index" / "embedder-mean" / "meta.json").read_text())
    stored = Store.open(store_path)
    assert meta["passages"] == sum(d.num_chunks for d in stored.documents())
    hits = Library(stored, lm=lm, encoder="embedder-mean").search("lava", documents=3)
    assert len(hits) >= 1 and all(-1.0001 <= h.score <= 1.0001 for h in hits)


def test_a_large_library_gets_a_graph_index_that_finds_what_the_exact_one_finds(store_path, lm, monkeypatch):
    import rag.index

    store = Store.open(store_path)
    exact = PassageIndex.open(store, "minilm")
    monkeypatch.setattr(rag.index, "GRAPH_FROM", 10)  # this store's passages count as a large library
    build_index(store, "minilm", progress=False)
    assert json.loads((store_path / "index" / "minilm" / "meta.json").read_text())["kind"] == "hnsw"
    graph = PassageIndex.open(Store.open(store_path), "minilm")
    assert graph.index.ntotal == exact.index.ntotal and graph.index.hnsw.efSearch == rag.index.GRAPH_SEARCH_DEPTH
    vector = Library(store, lm=lm)._question_vector("Where did the lava from the eruption go?")
    assert [(h.doc_id, h.chunk) for h in graph.search(vector, 5)] == [(h.doc_id, h.chunk) for h in exact.search(vector, 5)]
    doc_id = exact.passages[0]["doc_id"]
    assert graph.chunk_scores(vector, doc_id) == pytest.approx(exact.chunk_scores(vector, doc_id))


def test_a_library_reads_hashes_and_tokenises_a_text_once(store_path, lm, monkeypatch):
    library = Library(store_path, lm=lm)
    reads = []
    text = Store.text

    def counted(store, row):
        reads.append(row["doc_id"])
        return text(store, row)

    monkeypatch.setattr(Store, "text", counted)
    first = library.answer("What flowed down the volcano?", documents=2, strategy="hybrid", max_new_tokens=2)
    read_once = list(reads)
    again = library.answer("What flowed down the volcano?", documents=2, strategy="hybrid", max_new_tokens=2)
    assert len(set(read_once)) == len(read_once) and {s.doc_id for s in first.sources} <= set(read_once)
    assert reads == read_once  # the second query read (and hashed) no text again
    assert [s.chunk_ks for s in again.sources] == [s.chunk_ks for s in first.sources]
    assert again.answer == first.answer


def test_missing_and_stale_indexes_are_refused_not_rebuilt(store_path, tiny8, tmp_path):
    store = Store.open(store_path)
    with pytest.raises(UserError, match="no embedder-mean passage index.*extemb index"):
        PassageIndex.open(store, "embedder-mean")
    before = (store_path / "index" / "minilm" / "vectors.faiss").read_bytes()
    extra = tmp_path / "more"
    extra.mkdir()
    (extra / "football2.txt").write_text(document(9, "football"))
    precompute(str(extra), str(store_path), model=tiny8, chunk_size=16, progress=False)
    with pytest.raises(UserError, match="stale.*3 documents, the store now holds 4"):
        PassageIndex.open(Store.open(store_path), "minilm")
    assert (store_path / "index" / "minilm" / "vectors.faiss").read_bytes() == before  # nothing rewritten
    build_index(Store.open(store_path), "minilm", progress=False)
    assert PassageIndex.open(Store.open(store_path), "minilm").meta["documents"] == 4


# ---- answers -----------------------------------------------------------------------------------------------------


def test_answer_reads_the_retrieved_documents_within_the_window(store_path, lm):
    library = Library(store_path, lm=lm)
    for strategy in ("hybrid", "rag", "adaptive", "graded"):
        answer = library.answer("What flowed down the volcano?", documents=2, strategy=strategy, max_new_tokens=8)
        assert answer.new_tokens >= 1 and isinstance(answer.answer, str) and answer.strategy == strategy
        assert answer.input_positions + 8 <= lm.window
        assert len(answer.sources) == 2 and answer.sources[0].source.endswith("volcano.txt")
        for source in answer.sources:
            assert 1 <= source.k_min <= source.k_max <= 16 and 1 <= source.chunks_read <= source.chunks_total
            assert source.raw_chunks == [c for c, k in source.chunk_ks.items() if k == 1]
    volcano = answer.sources[0]
    topic_chunk = max(p["chunk"] for p in volcano.passages if "lava" in p["text"])
    hybrid = library.answer("What flowed down the volcano?", documents=2, strategy="hybrid", max_new_tokens=4)
    assert hybrid.strategy == "hybrid" and topic_chunk in hybrid.sources[0].raw_chunks  # the hit is read raw
    assert hybrid.sources[0].k_max > 1  # and the rest compressed
    graded = library.answer("What flowed down the volcano?", documents=2, strategy="graded", max_new_tokens=4)
    default = library.answer("What flowed down the volcano?", documents=2, max_new_tokens=4)
    assert default.strategy == DEFAULT_STRATEGY == "graded" and default.answer == graded.answer
    assert [s.chunk_ks for s in default.sources] == [s.chunk_ks for s in graded.sources]  # graded is the default


def test_stored_and_in_memory_documents_give_the_same_input_and_answer(store_path, lm):
    store = Store.open(store_path)
    stored = store.documents()[1]
    ids = lm.tokenizer(store.text(stored.row), add_special_tokens=False)["input_ids"]
    in_memory = InMemoryDocument(torch.from_numpy(stored.read()), 16)  # the same rows, held in memory
    relevance = [{3: 0.5, 10: 0.9}]
    a = build_query(lm, "Which team scored?", [stored], relevance, ["doc"], [ids], answer_tokens=6)
    b = build_query(lm, "Which team scored?", [in_memory], relevance, ["doc"], [ids], answer_tokens=6)
    assert a.chunk_ks == b.chunk_ks and a.chunk_ks[0][10] == 1 and torch.equal(a.embeds, b.embeds)
    assert generate_answer(lm, a.embeds, 6) == generate_answer(lm, b.embeds, 6)


def test_bad_questions_and_stores_are_refused(store_path, lm, tiny8, tmp_path):
    library = Library(store_path, lm=lm)
    with pytest.raises(ContextTooLongError, match="do not fit the window"):
        library.answer("why? " * 100, max_new_tokens=8)
    with pytest.raises(UserError, match="question is empty"):
        library.search("  ")
    other = load_extensible(str(save_tiny(tmp_path / "other", layers=8, seed=3)), chunk_size=16, window=256)
    with pytest.raises(UserError, match="built by another embedder or LLM"):
        Library(store_path, lm=other)
    Store.create_or_open(tmp_path / "empty", "e", "l", 64, 16)
    with pytest.raises(UserError, match="is empty; run: make precompute"):
        Library(tmp_path / "empty")


# ---- LangChain ---------------------------------------------------------------------------------------------------


def test_langchain_retriever_chat_model_and_llm(store_path, lm):
    library = Library(store_path, lm=lm)
    assert ChatExtensible(store=str(store_path)).library is None  # a cheap constructor: nothing loads
    assert ChatExtensible(store=str(store_path)).strategy == ExtensibleLLM(store=str(store_path)).strategy == "graded"
    retriever = StoreRetriever(library=library, k=3)
    documents = retriever.invoke("hot magma and lava")
    assert len(documents) == 3 and documents[0].metadata["source"].endswith("volcano.txt")
    assert [d.metadata["score"] for d in documents] == sorted((d.metadata["score"] for d in documents), reverse=True)
    assert len(retriever.invoke("hot magma", k=1)) == 1

    chat = ChatExtensible(library=library, max_new_tokens=6, documents=1)
    reply = chat.invoke("What flowed down the mountain?")
    assert isinstance(reply, AIMessage) and reply.response_metadata["sources"][0]["source"].endswith("volcano.txt")
    given = chat.invoke("Who cheered?", documents=retriever.invoke("football stadium fans", k=2))
    assert given.response_metadata["sources"][0]["source"].endswith("football.txt")
    chain = ChatPromptTemplate.from_template("{question}") | chat | StrOutputParser()
    assert isinstance(chain.invoke({"question": "What did the bank raise?"}), str)
    text = ExtensibleLLM(library=library, max_new_tokens=6).invoke("What did the bank raise?")
    assert isinstance(text, str) and "bank raise" not in text  # the answer only, never the prompt


def test_llamaindex_retriever_and_query_engine_match_the_library(store_path, lm):
    from rag import llamaindex

    library = Library(store_path, lm=lm)
    nodes = llamaindex.StoreRetriever(library=library, k=3).retrieve("hot magma and lava")
    documents = StoreRetriever(library=library, k=3).invoke("hot magma and lava")
    # the same passages, scores and chunk spans as the LangChain retriever, best first
    assert [(n.node.get_content(), n.score, n.node.metadata["doc_id"], n.node.metadata["chunk"],
             n.node.metadata["char_start"], n.node.metadata["char_end"]) for n in nodes] == \
        [(d.page_content, d.metadata["score"], d.metadata["doc_id"], d.metadata["chunk"], d.metadata["char_start"],
          d.metadata["char_end"]) for d in documents]
    assert nodes[0].node.metadata["source"].endswith("volcano.txt")
    with pytest.raises(UserError, match="k=0"):
        llamaindex.StoreRetriever(library=library, k=0)

    engine = llamaindex.ExtensibleQueryEngine(library=library, max_new_tokens=6, documents=1)
    response = engine.query("What flowed down the mountain?")
    expected = library.answer("What flowed down the mountain?", documents=1, max_new_tokens=6)
    assert response.response == expected.answer  # Library.answer with the default planner, greedy
    assert response.metadata["strategy"] == "graded"
    assert response.metadata["sources"][0]["source"].endswith("volcano.txt")
    assert {n.node.metadata["doc_id"] for n in response.source_nodes} == {expected.sources[0].doc_id}
    assert [n.node.get_content() for n in response.source_nodes] == [p["text"] for p in expected.sources[0].passages]


# ---- CLI ---------------------------------------------------------------------------------------------------------


def test_cli_index_and_ask(store_path, tiny8, capsys):
    assert main(["index", str(store_path), "--encoder", "embedder-mean"]) == 0
    assert "passages of 3 documents" in capsys.readouterr().out
    code = main(["ask", "--store", str(store_path), "--model", tiny8, "--window", "256", "--max-new-tokens", "4",
                 "--json", "Where did the lava go?"])
    answer = json.loads(capsys.readouterr().out)
    assert code == 0 and answer["sources"][0]["source"].endswith("volcano.txt") and answer["new_tokens"] >= 1
    assert answer["strategy"] == "graded" and build_parser().parse_args(["ask", "--store", "s", "q"]).strategy is None
    assert main(["ask", "--store", str(store_path.parent / "nowhere"), "q"]) == 2
    assert "no store at" in capsys.readouterr().err
    shutil.rmtree(store_path / "index")
    assert main(["ask", "--store", str(store_path), "--model", tiny8, "--window", "256", "q"]) == 2
    assert "no minilm passage index" in capsys.readouterr().err


# ---- QA evaluation -----------------------------------------------------------------------------------------------


def test_qa_metrics():
    assert token_f1("The lava flowed.", "lava flowed") == 1.0
    assert token_f1("red lava", "lava flowed") == pytest.approx(0.5)
    assert exact_match("The Lava!", "lava") == 1.0 and exact_match("lava", "magma") == 0.0
    assert rouge_l("x b c d", "x c d e") == pytest.approx(0.75)  # LCS "x c d": 3 of 4 both ways
    assert rouge_l("", "x") == 0.0


def test_limit_spreads_over_documents_and_over_each_documents_questions():
    chosen = spread_questions([200, 3, 50], 10)
    assert len(chosen) == 10 and chosen == sorted(chosen)
    by_doc = {d: [j for dd, j in chosen if dd == d] for d in range(3)}
    assert [len(v) for v in by_doc.values()] == [4, 3, 3]
    assert by_doc[0][0] == 0 and by_doc[0][-1] == 199 and by_doc[2][-1] == 49  # not the first questions only
    assert len(spread_questions([2, 2], None)) == 4 and len(spread_questions([2, 2], 100)) == 4


def qa_file(tmp_path, records, name="bank_qa.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_eval_qa_reads_answers_and_refuses_bad_files(tmp_path):
    good = {"input": "text", "instructions": ["q1", "q2"], "outputs": ["a", "b"], "answers": [["a", "A"], ["b"]]}
    assert read_leval(qa_file(tmp_path, [good]))[0]["references"] == [["a", "A"], ["b"]]
    without = {k: v for k, v in good.items() if k != "answers"}  # no answers: the outputs are the references
    assert read_leval(qa_file(tmp_path, [without]))[0]["references"] == [["a"], ["b"]]
    bad = {"not JSON": "{oops", "must be a list of strings": {**good, "instructions": "q1"},
           "empty reference": {**good, "answers": [["a"], [" "]]}, "2 instructions but 2 outputs / 1 answers":
           {**good, "answers": [["a"]]}, "lacks input": {"instructions": [], "outputs": []}}
    for message, record in bad.items():
        path = tmp_path / "bad.jsonl"
        path.write_text(record if isinstance(record, str) else json.dumps(record))
        with pytest.raises(UserError, match=message):
            read_leval(path)
    assert main(["eval-qa", "--data", str(tmp_path / "bad.jsonl"), "--methods", "window"]) == 2


def test_eval_qa_methods_agree_when_the_document_fits_and_hybrid_reads_rags_passages(lm, tiny8, tmp_path):
    short = {"input": TOPICS["bank"] + " " + TOPICS["football"], "instructions": ["What rose?", "Who cheered?"],
             "outputs": ["the interest rate", "the fans"]}
    long = {"input": document(1, "bank") + document(2, "volcano"), "instructions": ["What flowed?", "What rose?"],
            "outputs": ["lava", "rates"], "answers": [["lava", "red lava"], ["rates"]]}
    data = qa_file(tmp_path, [short, long])
    rows, records = evaluate_qa(lm, [data], ["window", "full", "rag", "hybrid", "ext:adaptive"], max_new_tokens=4,
                                progress=False)
    by = {(r["task"], r["method"]): r for r in rows}
    assert all(by[("bank_qa", m)]["n"] == 4 for m in ("window", "rag", "hybrid"))
    assert by[("bank_qa", "full")]["n"] == 2  # the long document does not fit the tiny model's 2,048 positions
    assert by[("bank_qa", "full")]["skipped"] == 2
    assert {r["method"] for r in rows if r["task"] == "all"} == {"window", "full", "rag", "hybrid", "ext:adaptive"}
    nll = {(r["document"], r["question_index"], r["method"]): r["answer_nll"] for r in records if "answer_nll" in r}
    for j in range(2):  # the short document fits: every method reads it whole, in order (full from a cached prefix)
        assert max(abs(nll[(0, j, m)] - nll[(0, j, "window")]) for m in ("full", "rag", "hybrid")) < 1e-3
    long_records = {r["method"]: r for r in records if r["document"] == 1 and r["question_index"] == 0 and "answer_nll" in r}
    rag_ks, hybrid_ks = long_records["rag"]["chunk_ks"], long_records["hybrid"]["chunk_ks"]
    assert set(rag_ks.values()) == {1} and {c for c, k in hybrid_ks.items() if k == 1} == set(rag_ks)
    assert len(hybrid_ks) > len(rag_ks)  # the rest of the document compressed
    assert all(0 <= r["f1"] <= 100 and r["answer_nll"] > 0 for r in records if "f1" in r)
    assert long_records["rag"]["f1"] >= 0 and "prediction" in long_records["hybrid"]
    report = qa_markdown(rows, records)
    assert "| hybrid | bank_qa | 4 |" in report and "minus `rag`" in report and "minus `window`" in report

    fast, _ = evaluate_qa(lm, [data], ["rag"], limit=1, max_new_tokens=4, generate=False, progress=False)
    assert fast[0]["n"] == 1 and np.isnan(fast[0]["f1"]) and fast[0]["answer_nll"] > 0
    read = {(r["document"], r["question_index"], r["method"]): r.get("answer_read") for r in records}
    assert read[(0, 0, "rag")] == read[(0, 1, "hybrid")] == "raw"  # the short document is read whole, raw
    assert read[(1, 1, "rag")] == "not in text" and read[(1, 0, "window")] is None  # "rates" is not in the text
    assert "by where `rag`'s input held the answer" in report
    evaluation = QAEvaluation(lm, max_new_tokens=4)
    doc = EvalDocument(lm, evaluation.encoder, long["input"])
    first = str(min(answer_chunks(doc.text, doc.char_offsets, "red lava")))
    assert answer_read(doc, ["red lava"], {first: 1}) == "raw"
    assert answer_read(doc, ["red lava"], {first: 8}) == "compressed"
    assert answer_read(doc, ["red lava"], {}) == "left out"
    assert answer_read(doc, ["no such words"], {first: 1}) == "not in text"
    lm.llm.config.max_position_embeddings, positions = 300, lm.llm.config.max_position_embeddings
    try:  # a document that does not fit the model's positions has no full-attention row
        assert evaluation.answer_nll("full", EvalDocument(lm, evaluation.encoder, long["input"]), "What?", [5]) is None
    finally:
        lm.llm.config.max_position_embeddings = positions
    assert main(["eval-qa", "--data", data, "--methods", "window,ext:0"]) == 2
    code = main(["eval-qa", "--data", data, "--methods", "window,hybrid", "--model", tiny8, "--chunk", "16",
                 "--window", "256", "--limit", "2", "--no-generate", "--json", str(tmp_path / "qa.json")])
    assert code == 0 and (tmp_path / "qa.png").stat().st_size > 0
    journal = tmp_path / "qa.questions.jsonl"
    first = [json.loads(line) for line in journal.read_text().splitlines()]
    assert len(first) == 4 and all("answer_nll" in r for r in first)
    journal.write_text("\n".join(json.dumps(r) for r in first[:3]) + '\n{"task": "cut sh')  # killed mid-write
    code = main(["eval-qa", "--data", data, "--methods", "window,hybrid", "--model", tiny8, "--chunk", "16",
                 "--window", "256", "--limit", "2", "--no-generate", "--json", str(tmp_path / "qa.json"), "--resume"])
    again = [json.loads(line) for line in journal.read_text().splitlines()]
    assert code == 0 and again[:3] == first[:3] and len(again) == 4  # three reused, the fourth recomputed
    assert again[3]["answer_nll"] == pytest.approx(first[3]["answer_nll"], abs=1e-4)


def test_eval_qa_max_k_sets_the_k_hybrid_reads_the_rest_at_and_is_recorded(lm, tiny8, tmp_path):
    long = {"input": document(1, "bank") + document(2, "volcano"), "instructions": ["What flowed?"], "outputs": ["lava"]}
    data = qa_file(tmp_path, [long])
    reads = {}
    for max_k in (None, 2):  # None: the default
        _, records = evaluate_qa(lm, [data], ["rag", "hybrid"], max_new_tokens=4, generate=False, progress=False,
                                 **({"max_k": max_k} if max_k else {}))
        reads[max_k] = {r["method"]: r["chunk_ks"] for r in records}
        # a resumed run reuses only its own max_k; the default is the coarsest k the plug-in trained at
        assert all(r["max_k"] == (max_k or lm.max_k) == (max_k or 16) for r in records if r["method"] == "hybrid")
    coarse, fine = reads[None]["hybrid"], reads[2]["hybrid"]
    assert {c for c, k in fine.items() if k == 1} == {c for c, k in coarse.items() if k == 1} == set(reads[2]["rag"])
    assert {k for k in fine.values() if k > 1} == {2} and max(coarse.values()) > 2
    assert len(fine) < len(coarse)  # at a finer k fewer of the other chunks fit, the most relevant first
    code = main(["eval-qa", "--data", data, "--methods", "hybrid", "--model", tiny8, "--chunk", "16", "--window", "256",
                 "--max-new-tokens", "4", "--max-k", "4", "--no-generate", "--json", str(tmp_path / "qa.json")])
    recorded = json.loads((tmp_path / "qa.questions.jsonl").read_text().splitlines()[0])
    assert code == 0 and {k for k in recorded["chunk_ks"].values() if k > 1} == {4} and recorded["max_k"] == 4


def test_the_plugins_trained_ks_set_max_k_and_a_new_plugin_reuses_only_the_records_that_read_no_rows(lm, tmp_path):
    long = {"input": document(1, "bank") + document(2, "volcano"), "instructions": ["What flowed?"],
            "outputs": ["lava"]}
    data, journal = qa_file(tmp_path, [long]), tmp_path / "qa.questions.jsonl"
    _, first = evaluate_qa(lm, [data], ["window", "rag", "hybrid"], max_new_tokens=4, generate=False, progress=False,
                           journal=journal)
    trained = lm.embedder.config.train_ks
    lm.embedder.config.train_ks = [2, 4]  # another plug-in (the config is part of its fingerprint), trained to k = 4
    try:
        assert lm.max_k == 4
        _, again = evaluate_qa(lm, [data], ["window", "rag", "hybrid"], max_new_tokens=4, generate=False,
                               progress=False, journal=journal)
    finally:
        lm.embedder.config.train_ks = trained
    assert again[:2] == first[:2] and "embedder_fingerprint" not in again[0]  # window and rag: reused as they were
    assert again[2]["embedder_fingerprint"] != first[2]["embedder_fingerprint"]  # hybrid: made again
    assert {k for k in again[2]["chunk_ks"].values() if k > 1} == {4} and again[2]["max_k"] == 4
    assert max(first[2]["chunk_ks"].values()) == 16 and len(journal.read_text().splitlines()) == 4
    # a window record of a journal from before (keyed on its plug-in and max_k, as every record then) still resumes
    old = {key: value for key, value in first[0].items() if key != "llm_weights"}
    old.update(embedder_fingerprint=first[2]["embedder_fingerprint"], max_k=16)
    journal.write_text(json.dumps(old) + "\n")
    _, resumed = evaluate_qa(lm, [data], ["window"], max_new_tokens=4, generate=False, progress=False, journal=journal)
    assert resumed == [old]


def test_eval_qa_skips_and_counts_a_question_longer_than_the_window_and_reads_a_one_chunk_document(lm, tmp_path):
    record = {"input": "Savers moved.", "instructions": ["why? " * 300, "Who moved?"], "outputs": ["x", "savers"]}
    rows, records = evaluate_qa(lm, [qa_file(tmp_path, [record])], ["rag", "hybrid"], max_new_tokens=4,
                                generate=False, progress=False)
    by = {r["method"]: r for r in rows if r["task"] == "bank_qa"}
    assert by["rag"]["n"] == 1 and by["rag"]["skipped"] == 1 and by["hybrid"]["skipped"] == 1
    assert [r["chunk_ks"] for r in records if "chunk_ks" in r] == [{"0": 1}, {"0": 1}]  # shorter than one chunk: raw


def test_foreign_reads_hybrids_plan_with_another_documents_compressed_rows(lm, tmp_path):
    first = {"input": document(1, "bank") + document(2, "volcano") + "The end.", "instructions": ["What flowed?"],
             "outputs": ["lava"]}
    second = {"input": letters(3, 2490) + TOPICS["football"], "instructions": ["Who cheered?"], "outputs": ["the fans"]}
    data = qa_file(tmp_path, [first, second])
    rows, records = evaluate_qa(lm, [data], ["hybrid", "foreign"], max_new_tokens=4, generate=False, progress=False)
    by = {(r["document"], r["method"]): r for r in records}
    for d in (0, 1):  # the same plan (raw passages and k per chunk), other rows where it compresses
        assert by[(d, "foreign:hybrid")]["chunk_ks"] == by[(d, "hybrid")]["chunk_ks"]  # foreign is foreign:hybrid
        assert any(k > 1 for k in by[(d, "hybrid")]["chunk_ks"].values())
        assert by[(d, "foreign:hybrid")]["answer_nll"] > 0 and by[(d, "foreign:hybrid")]["donor"] == 1 - d
    assert "| hybrid - foreign:hybrid | bank_qa | 2 |" in qa_markdown(rows, records)

    evaluation = QAEvaluation(lm, max_new_tokens=4)
    doc, donor = (EvalDocument(lm, evaluation.encoder, r["input"]) for r in (first, second))
    doc.donor = donor
    own, _ = evaluation.query("hybrid", doc, "What flowed?")
    other, _ = evaluation.query("foreign:hybrid", doc, "What flowed?")
    same = (own == other).all(dim=-1)[0]  # positions holding the same vector: template, question and raw passages
    assert own.shape == other.shape and same.sum() > 0 and not same.all()
    assert torch.equal(evaluation.query("foreign", doc, "What flowed?")[0], other)  # the old name, the same input
    foreign = ForeignRows(doc.stored, donor.stored)
    got, want = foreign.downscaled_chunks({0: 4, 1: 16}), donor.stored.downscaled_chunks({0: 4, 1: 16})
    assert all(torch.equal(got[c], want[c]) for c in (0, 1))  # chunk c holds the donor's chunk c, at its own k
    last = doc.stored.num_chunks - 1  # a last partial chunk gets the rows its own length keeps
    assert doc.stored.chunk_length(last) < doc.stored.chunk_size
    assert len(foreign.downscaled_chunks({last: 4})[last]) == num_kept(doc.stored.chunk_length(last), 4)
    with pytest.raises(UserError, match="one.jsonl: document 1 has no donor"):
        evaluate_qa(lm, [qa_file(tmp_path, [first], "one.jsonl")], ["foreign"], generate=False, progress=False)


def test_rag_k_reads_rags_chunks_compressed_and_its_foreign_control_the_donors_rows(lm):
    evaluation = QAEvaluation(lm, max_new_tokens=4)
    doc = EvalDocument(lm, evaluation.encoder, document(1, "bank") + document(2, "volcano"))
    doc.donor = EvalDocument(lm, evaluation.encoder, letters(5, 2000))
    question = "What flowed?"
    rag = evaluation.query("rag", doc, question)[1]["chunk_ks"]
    embeds, read = evaluation.query("rag:4", doc, question)
    assert len(rag) > 1 and read["chunk_ks"] == dict.fromkeys(rag, 4)  # exactly rag's chunks, all at k=4
    prompt, ks = Prompt(lm, question, None, 1, 4), {int(c): 4 for c in rag}

    def by_hand(rows_of) -> torch.Tensor:  # the template, each chunk's rows in document order, the question
        rows = rows_of.downscaled_chunks(ks, lm.method, lm.seed)
        return lm.compose(prompt.segments([[rows[c] for c in sorted(ks)]]))

    assert torch.equal(embeds, by_hand(doc.stored))  # no raw document token
    foreign, foreign_read = evaluation.query("foreign:rag:4", doc, question)
    assert foreign_read == read and torch.equal(foreign, by_hand(ForeignRows(doc.stored, doc.donor.stored)))
    assert not torch.equal(foreign, embeds)


def test_qa_methods_take_rag_k_and_foreign_controls_of_methods_that_read_compressed_chunks(tmp_path):
    assert parse_qa_methods("rag, rag:4,foreign,foreign:hybrid,foreign:rag:4,foreign:ext:graded") == [
        "rag", "rag:4", "foreign:hybrid", "foreign:rag:4", "foreign:ext:graded"]
    for bad, message in [("foreign:rag", "foreign:rag: rag reads nothing compressed"), ("foreign:full", "nothing"),
                         ("foreign:ext:4", "ext:K, the runtime's layout, has none"), ("rag:1", "K >= 2"),
                         ("foreign:foreign", "unknown method"), ("rag:x", "K >= 2")]:
        with pytest.raises(UserError, match=message):
            parse_qa_methods(bad)
    assert main(["eval-qa", "--data", str(tmp_path / "any.jsonl"), "--methods", "rag,foreign:rag"]) == 2


def test_donor_is_the_next_document_sharing_under_a_fifth_of_its_8_grams(lm):
    a, b = letters(1, 600), letters(3, 600)
    near = a[:300] + letters(2, 300)  # half of a's 8-grams, like neighbouring L-Eval records
    tokenizer, size = lm.tokenizer, lm.chunk_size
    assert choose_donors(tokenizer, [a, near, b], size, [0, 1, 2], "f.jsonl") == {0: 2, 1: 2, 2: 0}
    assert choose_donors(tokenizer, [a, a[100:300], b], size, [0], "f.jsonl") == {0: 2}  # a donor inside the document
    assert choose_donors(tokenizer, [a, "short", b], size, [0], "f.jsonl") == {0: 2}  # no whole chunk
    with pytest.raises(UserError, match="f.jsonl: document 1 has no donor.*add other documents"):
        choose_donors(tokenizer, [a, near], size, [0], "f.jsonl")


def test_eval_qa_reports_each_foreign_control_and_the_content_rag_k_recovers(lm, tmp_path):
    first = {"input": document(1, "bank") + document(2, "volcano"), "instructions": ["What flowed?", "What rose?"],
             "outputs": ["lava", "rates"]}
    second = {"input": letters(3, 2500), "instructions": ["Who cheered?"], "outputs": ["fans"]}
    methods = parse_qa_methods("window,rag,rag:4,foreign:rag:4,hybrid,foreign")
    rows, records = evaluate_qa(lm, [qa_file(tmp_path, [first, second])], methods, max_new_tokens=4, generate=False,
                                progress=False)
    by = {(r["document"], r["question_index"], r["method"]): r for r in records}
    assert by[(0, 0, "foreign:rag:4")]["chunk_ks"] == by[(0, 0, "rag:4")]["chunk_ks"]
    assert set(by[(0, 0, "rag:4")]["chunk_ks"]) == set(by[(0, 0, "rag")]["chunk_ks"])
    report = qa_markdown(rows, records)
    for line in ("| rag:4 - foreign:rag:4 | all | 3 |", "| hybrid - foreign:hybrid | all | 3 |",
                 "Content recovered", "| rag:4 | all | 3 |", "| rag held the answer |"):
        assert line in report
    # the content control split by where rag held the answer, beside hybrid - rag's split
    assert re.search(r"\| hybrid - foreign:hybrid \| (raw|left out|not in text) \| all \|", report)
    assert re.search(r"\| hybrid - rag \| (raw|left out|not in text) \| all \|", report)
    rename = lambda rs: [{**r, "method": "foreign"} if r["method"] == "foreign:hybrid" else r for r in rs]  # noqa: E731
    assert qa_markdown(rename(rows), rename(records)) == report  # a report of before foreign:M, read alike


def test_all_rows_weigh_every_question_alike():
    records = [{"task": "one", "document": 0, "question_index": 0, "method": m, "answer_nll": v, "seconds": 1.0}
               for m, v in (("hybrid", 11.0), ("rag", 1.0))]
    records += [{"task": "many", "document": 0, "question_index": j, "method": m, "answer_nll": 1.0 + j,
                 "seconds": 1.0} for j in range(4) for m in ("hybrid", "rag")]
    differences = paired_differences(records, "hybrid", "rag")
    assert differences["one"][:2] == (1, 10.0) and differences["many"][:2] == (4, 0.0)
    assert differences["all"][:2] == (5, 2.0)  # the files' average would be 5.0
    rows = summarise(records, ["hybrid", "rag"], ["one", "many"])
    pooled = next(r for r in rows if r["method"] == "hybrid" and r["task"] == "all")
    assert pooled["n"] == 5 and pooled["answer_nll"] == pytest.approx((11 + 1 + 2 + 3 + 4) / 5)
    assert "| hybrid | all | 5 | +2.000 |" in qa_markdown(rows, records)


def test_same_stem_files_in_other_folders_stay_separate_tasks(lm, tmp_path):
    files = []
    for folder, questions in (("a", ["Who moved?"]), ("b", ["What moved?", "Where?"])):
        (tmp_path / folder).mkdir()
        record = {"input": "Savers moved.", "instructions": questions, "outputs": ["x"] * len(questions)}
        files.append(qa_file(tmp_path / folder, [record]))
    assert task_names(files) == ["a/bank_qa.jsonl", "b/bank_qa.jsonl"]
    assert task_names([files[0], str(tmp_path / "other.jsonl")]) == ["bank_qa", "other"]  # the stem when unambiguous
    with pytest.raises(UserError, match="given twice"):
        task_names([files[0], str(tmp_path / "a" / ".." / "a" / "bank_qa.jsonl")])
    rows, records = evaluate_qa(lm, files, ["rag"], max_new_tokens=4, generate=False, progress=False,
                                journal=tmp_path / "journal.jsonl")
    assert {r["task"]: r["n"] for r in rows} == {"a/bank_qa.jsonl": 1, "b/bank_qa.jsonl": 2, "all": 3}
    assert [(r["task"], r["question"]) for r in records] == [
        ("a/bank_qa.jsonl", "Who moved?"), ("b/bank_qa.jsonl", "What moved?"), ("b/bank_qa.jsonl", "Where?")]
    _, again = evaluate_qa(lm, files, ["rag"], max_new_tokens=4, generate=False, progress=False,
                           journal=tmp_path / "journal.jsonl")
    assert again == records  # each file's records reused for that file only


def test_ext_k_reads_the_chat_templates_opening_raw_in_front(tiny8):
    lm = load_extensible(tiny8, chunk_size=16, window=256)
    lm.tokenizer = copy.deepcopy(lm.tokenizer)
    lm.tokenizer.chat_template = "SYSTEM! {% for m in messages %}{{ m['content'] }}{% endfor %} ANSWER:"
    evaluation = QAEvaluation(lm, max_new_tokens=4)
    text = " ".join(np.random.default_rng(3).choice(["alpha", "beta", "gamma", "delta"], 300))
    doc = EvalDocument(lm, evaluation.encoder, text)
    opening, ids, k = evaluation._layout_ids(doc, "What came last?", 4)
    assert lm.tokenizer.decode(opening) == "SYSTEM! " and k == 4
    assert not lm.tokenizer.decode(ids[:8]).startswith("SYSTEM")  # the opening is not where chunk 0 is compressed
    assert lm.tokenizer.decode(ids).endswith("What came last? ANSWER:")
    layout = lm.layout(4, len(opening))
    assert layout.compressed_chunks(len(ids) + 4 - 1) > 0  # the document is long: compressed, and the answer fits
    reference = lm.tokenizer("gamma", add_special_tokens=False)["input_ids"][:4]
    nll, _ = evaluation.answer_nll("ext:4", doc, "What came last?", reference)
    assert nll == pytest.approx(lm.score(ids + reference, len(reference), 4, prefix=opening).mean_nll)


def test_eval_qa_over_the_stored_library_finds_each_questions_document(lm, tiny8, tmp_path):
    records = [{"input": document(seed, topic), "instructions": [question], "outputs": [answer]}
               for seed, (topic, question, answer) in enumerate([
                   ("volcano", "Where did the red lava and hot magma flow?", "down the mountain"),
                   ("bank", "What did the bank raise on loans and mortgages?", "the interest rate"),
                   ("football", "Who cheered for the striker in the stadium?", "the fans")])]
    data = qa_file(tmp_path, records)
    store = tmp_path / "library"
    with pytest.raises(UserError, match="give --store"):
        evaluate_qa(lm, [data], ["library:rag"], progress=False)
    precompute(data, str(store), model=tiny8, chunk_size=16, progress=False, text_column="input")
    build_index(Store.open(store), "minilm", progress=False)
    rows, asked = evaluate_qa(lm, [data], ["rag", "library:rag", "library:hybrid", "library:graded"],
                              max_new_tokens=4, generate=False, progress=False, store=store)
    library = {r["method"]: r for r in rows if r["task"] == "all"}
    assert library["library:rag"]["hit@1"] == library["library:hybrid"]["hit@1"] == 1.0  # one topic each
    assert library["library:graded"]["hit@1"] == 1.0 and library["library:graded"]["n"] == 3  # the default planner
    assert library["library:rag"]["hit@3"] == 1.0 and library["library:rag"]["n"] == 3
    for record in (r for r in asked if r["method"].startswith("library:")):
        assert len(record["sources"]) == 2 and record["answer_nll"] > 0
    report = qa_markdown(rows, asked)
    assert "| all | library:rag | 3 | 1.00 | 1.00 |" in report
    other = qa_file(tmp_path, [{"input": document(9, "bank"), "instructions": ["q"], "outputs": ["a"]}], "other.jsonl")

    # A resumed run reuses library records while the library holds the same documents, wherever it lives; one more
    # document (it may be what a question now retrieves) makes every library record new, the plain ones stay.
    journal, moved = tmp_path / "asked.jsonl", tmp_path / "moved"
    methods = ["rag", "library:rag"]
    evaluate_qa(lm, [data], methods, generate=False, progress=False, store=store, journal=journal)
    shutil.copytree(store, moved)
    _, again = evaluate_qa(lm, [data], methods, generate=False, progress=False, store=moved, journal=journal)
    assert len(journal.read_text().splitlines()) == 6 and again == [json.loads(line) for line in
                                                                     journal.read_text().splitlines()]
    precompute(other, str(moved), model=tiny8, chunk_size=16, progress=False, text_column="input")
    build_index(Store.open(moved), "minilm", progress=False)
    evaluate_qa(lm, [data], methods, generate=False, progress=False, store=moved, journal=journal)
    added = [json.loads(line)["method"] for line in journal.read_text().splitlines()[6:]]
    assert added == ["library:rag"] * 3
    with pytest.raises(UserError, match="1 documents of .*other.jsonl are not in the store .*--text-column input"):
        evaluate_qa(lm, [other], ["library:rag"], progress=False, store=store)
    with pytest.raises(UserError, match="over a stored library: library:rag, library:hybrid, library:graded"):
        parse_qa_methods("library:adaptive")
    with pytest.raises(UserError, match="rag:32: K must be at most the chunk size \\(16\\)"):
        evaluate_qa(lm, [data], ["rag:32"], progress=False)
