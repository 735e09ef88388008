"""The QA training stage on a tiny random Llama with the real all-MiniLM-L6-v2: its samples are the library's hybrid
queries, its loss is the answer NLL eval-qa measures (with ``contrast``, plus a hinge on eval-qa's hybrid - foreign),
only compressed chunks are encoded, ``left_out`` draws the questions rag cannot answer from its passages, and resume
is exact."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from extensible import EmbedderConfig, ExtensibleEmbedder, ExtensibleLM, UserError
from extensible.training import TrainConfig, Trainer
from jobs.train_qa import main as train_qa
from rag.qa_eval import EvalDocument, QAEvaluation, answer_read
from rag.library import InMemoryDocument
from rag.qa_train import QAObjective

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
FACT = "The bank raised the interest rate on loans, and savers moved their deposits."


def qa_records(count: int = 2) -> list[dict]:
    rng = np.random.default_rng(0)
    filler = lambda n: " ".join(rng.choice(WORDS, n))  # noqa: E731
    return [{"input": f"{filler(120)}\n{FACT}\n{filler(120)}\n", "instructions": ["What did the bank raise?", "Who moved?"],
             "outputs": ["the interest rate", "savers"], "answers": [["the interest rate", "rates"], ["savers"]]}
            for _ in range(count)]


@pytest.fixture
def qa_path(tmp_path):
    path = tmp_path / "train_qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in qa_records()))
    return path


def test_a_sample_is_the_hybrid_query_and_its_loss_the_answer_nll_eval_qa_measures(tiny, qa_path, tmp_path):
    llm, tokenizer = tiny
    embedder = ExtensibleEmbedder.from_llm(llm, tokenizer, EmbedderConfig(num_layers=2, chunk_size=16))
    one = tmp_path / "one.jsonl"
    record = qa_records(1)[0]
    one.write_text(json.dumps({**record, "instructions": record["instructions"][:1], "outputs": ["rates"],
                               "answers": [["rates"]]}) + "\n")
    objective = QAObjective([str(one)], tokenizer, windows=(256,), questions=3, answer_tokens=8)
    loss = objective.loss(llm, embedder)
    loss.backward()
    assert all(p.grad is None for p in llm.parameters())  # the LLM stays frozen: only the embedder learns
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in embedder.parameters() if p.requires_grad)

    lm = ExtensibleLM(llm, tokenizer, embedder, window=256)
    evaluation = QAEvaluation(lm, max_new_tokens=8)
    document = EvalDocument(lm, evaluation.encoder, record["input"])
    answer = tokenizer("rates", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():  # eval-qa's hybrid input and its teacher-forced NLL of the same answer
        embeds, read = evaluation.query("hybrid", document, record["instructions"][0])
        expected = lm.score_continuation(embeds, answer).mean_nll
    assert loss.item() == pytest.approx(expected, abs=1e-4)

    stored = InMemoryDocument.lazy(document.ids, 16, embedder)
    compressed = {int(c) for c, k in read["chunk_ks"].items() if k > 1}
    stored.downscaled_chunks({c: 8 for c in compressed})
    assert set(stored.encoded) == compressed and len(compressed) < stored.num_chunks  # raw chunks never encoded
    long = tmp_path / "long.jsonl"  # a question longer than the window is skipped, as eval-qa skips it
    long.write_text(json.dumps({**record, "instructions": ["why? " * 100], "outputs": ["x"], "answers": [["x"]]}) + "\n")
    assert QAObjective([str(long)], tokenizer, windows=(256,), answer_tokens=8).loss(llm, embedder).item() == 0
    with pytest.raises(UserError, match="qa-questions"):
        QAObjective([str(one)], tokenizer, questions=0)


def train_config(tiny_path, tmp_path, out, **overrides):
    books = tmp_path / "books"
    books.mkdir(exist_ok=True)
    (books / "one.txt").write_text(" ".join(np.random.default_rng(1).choice(WORDS, 400)) + "\n")
    return TrainConfig(**{**dict(data=[str(books)], out=str(out), model=str(tiny_path), num_layers=2, chunk_size=16,
                                 sample_tokens=64, ks=[2, 4], steps=4, save_every=2, lr=1e-3), **overrides})


def test_the_qa_stage_resumes_exactly_and_refuses_other_qa_settings(tiny_path, qa_path, tmp_path):
    def objectives(questions):
        return lambda trainer: [QAObjective([str(qa_path)], trainer.tokenizer, (256,), questions, 8)]

    straight = Trainer(train_config(tiny_path, tmp_path, tmp_path / "a"), progress=False, objectives=objectives(2))
    summary = straight.train()
    assert summary["loss"] == pytest.approx(summary["loss_books"] + summary["loss_qa"], rel=1e-4)
    interrupted = Trainer(train_config(tiny_path, tmp_path, tmp_path / "b"), progress=False, objectives=objectives(2))
    interrupted.train(until=2)
    resumed = Trainer(train_config(tiny_path, tmp_path, tmp_path / "b"), progress=False, objectives=objectives(2))
    resumed.train()
    a = load_file(tmp_path / "a" / "checkpoint" / "plugin" / "embedder.safetensors")
    b = load_file(tmp_path / "b" / "checkpoint" / "plugin" / "embedder.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)
    with pytest.raises(UserError, match="another configuration.*objectives"):
        Trainer(train_config(tiny_path, tmp_path, tmp_path / "b", steps=6), progress=False,
                objectives=objectives(1)).train()

    args = ["--data", str(tmp_path / "books"), "--model", str(tiny_path), "--layers", "2", "--chunk", "16",
            "--sample-tokens", "64", "--ks", "2", "--steps", "1", "--out", str(tmp_path / "cli"), "--qa", str(qa_path),
            "--qa-windows", "256", "--qa-questions", "1", "--qa-answer-tokens", "8"]
    assert train_qa(args) == 0 and (tmp_path / "cli" / "checkpoint" / "plugin" / "embedder.safetensors").exists()
    recorded = json.loads((tmp_path / "cli" / "checkpoint" / "train_config.json").read_text())
    assert recorded["objectives"]["qa"]["questions"] == 1
    assert train_qa([*args[:-8], "--qa", str(tmp_path / "missing.jsonl")]) == 2


def test_contrast_adds_the_hinge_on_hybrid_minus_foreign_as_eval_qa_measures_them(tiny, qa_path):
    llm, tokenizer = tiny
    embedder = ExtensibleEmbedder.from_llm(llm, tokenizer, EmbedderConfig(num_layers=2, chunk_size=16))
    objective = QAObjective([str(qa_path)], tokenizer, windows=(256,), questions=2, answer_tokens=8, contrast=2.0,
                            margin=0.5)
    loss = objective.loss(llm, embedder)
    loss.backward()
    assert all(p.grad is None for p in llm.parameters())

    # the same draw again; eval-qa reads document 0 with its donor, the other document of the file
    records = qa_records()
    references = [objective.records[0]["references"][j][0] for j in (0, 1)]
    objective.records[0]["references"] = [[r] for r in references]  # one reference each: the draw cannot differ
    objective.draw = lambda: (0, [0, 1], 256, 1)  # document 0, both questions, donor document 1
    with torch.no_grad():
        loss = objective.loss(llm, embedder)
    lm = ExtensibleLM(llm, tokenizer, embedder, window=256)
    evaluation = QAEvaluation(lm, max_new_tokens=8)
    document = EvalDocument(lm, evaluation.encoder, records[0]["input"])
    document.donor = EvalDocument(lm, evaluation.encoder, records[1]["input"])
    own, foreign, lengths = [], [], []
    with torch.no_grad():
        for j, reference in enumerate(references):
            answer = tokenizer(reference, add_special_tokens=False)["input_ids"][:7] + [tokenizer.eos_token_id]
            own.append(lm.score_continuation(evaluation.query("hybrid", document, records[0]["instructions"][j])[0],
                                             answer).mean_nll)
            foreign.append(lm.score_continuation(evaluation.query("foreign", document, records[0]["instructions"][j])[0],
                                                 answer).mean_nll)
            lengths.append(len(answer))
    assert own != foreign  # the tiny model's rows differ between the documents: the hinge has something to see
    mean_own = sum(o * n for o, n in zip(own, lengths)) / sum(lengths)
    hinge = sum(max(0.0, 0.5 + o - f) for o, f in zip(own, foreign)) / 2
    assert loss.item() == pytest.approx(mean_own + 2.0 * hinge, abs=1e-4)
    assert objective.metrics["own_minus_foreign"] == pytest.approx((own[0] - foreign[0] + own[1] - foreign[1]) / 2,
                                                                   abs=1e-4)
    one_document = qa_path.parent / "one_document.jsonl"
    one_document.write_text(json.dumps(records[0]) + "\n")
    with pytest.raises(UserError, match="two or more"):
        QAObjective([str(one_document)], tokenizer, contrast=1.0)


def test_left_out_draws_the_questions_whose_answer_rags_input_leaves_out(tiny, tmp_path):
    llm, tokenizer = tiny
    embedder = ExtensibleEmbedder.from_llm(llm, tokenizer, EmbedderConfig(num_layers=2, chunk_size=16))
    rng = np.random.default_rng(3)
    filler = lambda n: " ".join(rng.choice(WORDS, n))  # noqa: E731
    record = {"input": f"The river town kept a zebra named Orlando.\n{filler(300)}\n{FACT}\n{filler(300)}\n",
              "instructions": ["What did the bank raise on loans?", "What was the name of the animal?"],
              "outputs": ["the interest rate", "Orlando"], "answers": [["the interest rate"], ["Orlando"]]}
    path = tmp_path / "left_out.jsonl"
    path.write_text(json.dumps(record) + "\n")
    lm = ExtensibleLM(llm, tokenizer, embedder, window=128)
    evaluation = QAEvaluation(lm, max_new_tokens=8)
    document = EvalDocument(lm, evaluation.encoder, record["input"])
    where = [answer_read(document, record["answers"][j], evaluation.query("rag", document, q)[1]["chunk_ks"])
             for j, q in enumerate(record["instructions"])]
    assert sorted(where) == ["left out", "raw"]  # the premise: one answer read raw by rag, one left out
    objective = QAObjective([str(path)], tokenizer, windows=(128,), questions=1, answer_tokens=8, left_out=True)
    doc = objective._document(lm, 0)
    for order in ([0, 1], [1, 0]):
        assert objective._questions(lm, doc, 0, order) == [where.index("left out")]
    assert len(QAObjective([str(path)], tokenizer, questions=1).draw()[1]) == 1  # without: the draw's questions
    assert objective.settings()["left_out"] and "left_out" not in QAObjective([str(path)], tokenizer).settings()
