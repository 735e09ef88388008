"""The read stage on a tiny random Llama: samples whose evidence exists only compressed, the loss the frozen LLM
gives them (next-token, KL to the LLM reading the evidence raw, the own-vs-foreign hinge), QA samples laid out as
eval-qa's rag:K reads them, and the recipe's GPU sizing run at tiny size on the CPU, resuming exactly."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from extensible import EmbedderConfig, ExtensibleEmbedder, UserError
from extensible.downscale import downscale_chunk
from extensible.reading import ReadingSample, ReadingWeights, foreign_rows, reading_loss
from extensible.text import evidence_only
from extensible.training import book_reading_samples
from jobs.read_recipe import main as read_recipe
from jobs.report import plot_content_gap
from rag.library import prompt_parts
from rag.read_train import QAReading

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def words(seed: int, n: int) -> str:
    return " ".join(np.random.default_rng(seed).choice(WORDS, n))


@pytest.fixture
def embedder(tiny):
    llm, tokenizer = tiny
    torch.manual_seed(0)
    return ExtensibleEmbedder.from_llm(llm, tokenizer, EmbedderConfig(num_layers=2, chunk_size=16, row_mlp=32))


def samples_of(tokenizer, count: int) -> list[ReadingSample]:
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [ReadingSample(ids("Q:"), [ids(words(s, 20))[:16], ids(words(s + 9, 20))[:11]], ids("\nA:"),
                          ids(words(s + 5, 5))[:8]) for s in range(count)]


def test_the_student_reads_only_rows_and_the_loss_is_its_target_nll(tiny, embedder):
    llm, tokenizer = tiny
    samples = samples_of(tokenizer, 2)
    loss, metrics = reading_loss(llm, embedder, samples, [4, 2], 16, ReadingWeights(ce=1, distill=0, contrast=0))
    loss.backward()
    assert all(p.grad is None for p in llm.parameters())  # the LLM stays frozen
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in embedder.parameters() if p.requires_grad)

    # by hand: [before tokens, each chunk's rows at its k, after tokens, target[:-1]] -> NLL of the target
    embed = llm.get_input_embeddings()
    expected = []
    with torch.no_grad():
        for sample, k in zip(samples, [4, 2]):
            rows = [downscale_chunk(embedder(torch.tensor([chunk]))[0], k, "strided", chunk_index=j)
                    for j, chunk in enumerate(sample.evidence)]
            assert sum(len(r) for r in rows) == -(-16 // k) - (-11 // k)  # the kept rows: no raw copy of the evidence
            inputs = torch.cat([embed(torch.tensor(sample.before)), *rows, embed(torch.tensor(sample.after)),
                                embed(torch.tensor(sample.target[:-1]))])[None]
            logits = llm(inputs_embeds=inputs).logits[0, -len(sample.target):]
            expected.append(F.cross_entropy(logits, torch.tensor(sample.target), reduction="sum"))
    assert loss.item() == pytest.approx((sum(expected) / sum(len(s.target) for s in samples)).item(), rel=1e-4)
    assert "own_minus_foreign" in metrics and "kl" not in metrics  # the control is measured even without its hinge


def test_distillation_and_the_hinge_add_their_terms(tiny, embedder):
    llm, tokenizer = tiny
    samples = samples_of(tokenizer, 3)
    base, plain = reading_loss(llm, embedder, samples, [4, 4, 4], 16, ReadingWeights(ce=1, distill=0, contrast=0))
    both, metrics = reading_loss(llm, embedder, samples, [4, 4, 4], 16,
                                 ReadingWeights(ce=1, distill=2, contrast=3, margin=0.5))
    assert metrics["kl"] > 0 and metrics["teacher_nll"] > 0
    hinge = max(0.0, 0.5 + metrics["own_minus_foreign"])  # a lower bound: relu of the mean <= mean of the relus
    assert both.item() >= base.item() + 2 * metrics["kl"] + 3 * hinge - 1e-4
    assert metrics["own_minus_foreign"] == pytest.approx(plain["own_minus_foreign"], abs=1e-5)


def test_the_own_only_hinge_moves_the_own_reading_alone(tiny, embedder):
    # Equal target lengths, so the next-token loss (mean over tokens) equals the mean of per-sample NLLs; with a
    # margin no gap reaches, the own-only hinge's gradient is then the next-token loss's, and the plain hinge's is not
    # (it also pushes the foreign reading up).
    llm, tokenizer = tiny
    samples = samples_of(tokenizer, 3)
    for sample in samples:
        sample.target = sample.target[:4]
    trainable = [p for p in embedder.parameters() if p.requires_grad]

    def gradient(weights):
        embedder.zero_grad()
        reading_loss(llm, embedder, samples, [4, 4, 4], 16, weights)[0].backward()
        return torch.cat([p.grad.flatten() for p in trainable])

    next_token = gradient(ReadingWeights(ce=1, distill=0, contrast=0))
    own_only = gradient(ReadingWeights(ce=0, distill=0, contrast=1, margin=100, contrast_own_only=True))
    both = gradient(ReadingWeights(ce=0, distill=0, contrast=1, margin=100))
    assert next_token.norm() > 0
    assert torch.allclose(own_only, next_token, rtol=1e-3, atol=1e-6 * next_token.abs().max().item())
    assert (both - next_token).norm() > 0.05 * next_token.norm()


def test_foreign_rows_fill_the_own_slots_with_another_documents_rows():
    own = [torch.zeros(16, 3), torch.zeros(11, 3)]
    donor = [torch.arange(48.0).view(16, 3) + 1]
    rows = foreign_rows(own, donor, 4, "strided")
    assert [len(r) for r in rows] == [4, 3]  # the own chunks' slot counts
    assert all((r != 0).all() for r in rows)  # every slot holds a donor row


def test_book_samples_hold_the_evidence_once_and_reconstruct_on_request():
    ids = torch.arange(64).view(2, 32)
    continuation, again = book_reading_samples(ids, 16, 4, [False, True])
    assert continuation.evidence == [list(range(16))] and continuation.target == list(range(16, 20))
    assert again.evidence == [list(range(32, 48))] and again.target == list(range(32, 48))


def test_book_samples_keep_recent_chunks_raw_between_the_evidence_and_the_target():
    ids = torch.arange(128).view(2, 64)  # 4 chunks of 16 a sample
    far, again = book_reading_samples(ids, 16, 4, [False, True], recent=[2, 2])
    assert far.evidence == [list(range(16))] and far.after == list(range(16, 48)) and far.target == list(range(48, 52))
    # a reconstruction keeps no raw chunk: its target is the evidence, all of it before the last chunk
    assert again.evidence == [list(range(64, 80)), list(range(80, 96)), list(range(96, 112))] and again.after == []


def test_evidence_only_tokens_are_first_seen_in_the_evidence():
    # 5 is in the evidence only; 6 also in the raw text; 7 common; 8 nowhere before; the second 5 is a copy
    assert evidence_only([5, 6, 7, 8, 5], evidence=[5, 6, 7], raw=[6], common={7}) == [True, False, False, False, False]
    ids = torch.arange(64).view(1, 64)
    ids[0, 60] = 3  # the target (chunk 3) repeats a token of the evidence (chunk 0), not of the raw chunks 1-2
    (sample,) = book_reading_samples(ids, 16, 16, [False], recent=[2], focus=4.0, common=set())
    assert sample.weights == [5.0 if i == 12 else 1.0 for i in range(16)]
    (again,) = book_reading_samples(ids, 16, 16, [True], focus=4.0, common=set())
    assert again.weights is None  # a reconstruction's target is the evidence itself


def test_token_weights_weigh_the_next_token_loss_and_the_focus_control(tiny, embedder):
    llm, tokenizer = tiny
    samples = samples_of(tokenizer, 2)
    weights = ReadingWeights(ce=1, distill=0, contrast=0)

    def loss_with(first: float, rest: float):  # each sample's first target token weighs `first`, the others `rest`
        for sample in samples:
            sample.weights = [first] + [rest] * (len(sample.target) - 1)
        with torch.no_grad():
            return reading_loss(llm, embedder, samples, [4, 4], 16, weights)

    plain, plain_metrics = loss_with(1.0, 1.0)
    first_only, _ = loss_with(1.0, 0.0)  # the mean NLL of the two first tokens
    weighted, metrics = loss_with(3.0, 1.0)
    tokens = sum(len(s.target) for s in samples)
    assert weighted.item() == pytest.approx((plain.item() * tokens + 2 * 2 * first_only.item()) / (tokens + 4), rel=1e-4)
    for name in ("own_minus_foreign", "own_nll"):  # the measurements stay unweighted
        assert metrics[name] == pytest.approx(plain_metrics[name], abs=1e-5)
    assert "focus_own_minus_foreign" in metrics and "focus_own_minus_foreign" not in plain_metrics


def qa_file(tmp_path, documents: int = 3):
    records = [{"input": f"{words(d, 60)} The key was hidden under stone {d}. {words(d + 50, 60)}",
                "instructions": ["Where was the key?"], "outputs": [f"under stone {d}"],
                "answers": [[f"under stone {d}"]]} for d in range(documents)]
    path = tmp_path / "qa_train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_qa_samples_are_rag_k_reads_of_the_answers_chunk_from_distinct_documents(tiny, tmp_path):
    _, tokenizer = tiny
    objective = QAReading([str(qa_file(tmp_path))], tokenizer, 64, [8], ReadingWeights(), questions=3,
                          distractors=1, answer_tokens=20)
    samples, ks = objective.draw()
    assert len(samples) == 3 and ks == [8, 8, 8]
    before, after = prompt_parts(tokenizer, "Where was the key?")
    stones = set()
    for sample in samples:
        assert sample.before == before
        assert sample.after == tokenizer("\n\n", add_special_tokens=False)["input_ids"] + after
        text = [tokenizer.decode(chunk) for chunk in sample.evidence]
        assert len(sample.evidence) == 2 and sum("under stone" in t for t in text) >= 1
        stone = next(t for t in text if "under stone" in t).split("under stone ")[1][0]
        stones.add(stone)
        assert tokenizer.decode(sample.target[:-1]) == f"under stone {stone}"  # the answer of the evidence's document
        assert sample.target[-1] == tokenizer.eos_token_id  # a whole answer ends the turn
    assert len(stones) == 3  # three documents
    cut = QAReading([str(qa_file(tmp_path))], tokenizer, 64, [8], ReadingWeights(), questions=2, answer_tokens=5)
    assert all(tokenizer.decode(s.target) == "under" for s in cut.draw()[0])  # a cut answer does not end the turn
    with pytest.raises(UserError, match="qa-questions"):
        QAReading([str(qa_file(tmp_path))], tokenizer, 64, [8], ReadingWeights(), questions=1)
    opened = [[2]]  # the trainer's curriculum: what ks_now returns changes with the step
    staged = QAReading([str(qa_file(tmp_path))], tokenizer, 64, [2, 8], ReadingWeights(), questions=3,
                       ks_now=lambda: opened[0])
    assert staged.draw()[1] == [2, 2, 2]
    opened[0] = [8]
    assert staged.draw()[1] == [8, 8, 8]


def test_the_gpu_recipe_runs_tiny_on_the_cpu_and_resumes_exactly(tiny_path, tmp_path):
    books = tmp_path / "books"
    books.mkdir()
    (books / "one.txt").write_text(words(1, 300))
    (books / "two.txt").write_text(words(2, 300))
    tiny = ["--gpu", "--far", "--model", str(tiny_path), "--init-from", "", "--data", str(books), "--exclude",
            "--qa", str(qa_file(tmp_path)), "--qa-questions", "2", "--layers", "2", "--chunk", "64",
            "--sample-tokens", "128", "--recent-chunks", "0", "--target-tokens", "8", "--ks", "2", "4",
            "--k-curriculum", "2", "--row-mlp", "16", "--batch-size", "2", "--steps", "3", "--max-minutes", "60",
            "--save-every", "1", "--val-data", str(books), "--val-every", "2", "--val-tokens", "256"]
    assert read_recipe([*tiny, "--out", str(tmp_path / "straight")]) == 0
    assert read_recipe([*tiny, "--out", str(tmp_path / "resumed"), "--stop-at", "1"]) == 0
    assert read_recipe([*tiny, "--out", str(tmp_path / "resumed")]) == 0
    a, b = (load_file(tmp_path / run / "checkpoint" / "plugin" / "embedder.safetensors") for run in ("straight", "resumed"))
    assert any(key.startswith("row_mlp.") for key in a)
    assert all(torch.equal(a[key], b[key]) for key in a)
    gap = plot_content_gap(tmp_path / "resumed")  # the plot run() drew, over both invocations' TensorBoard files
    assert [step for step, _ in gap["qa_read_own_minus_foreign"]] == [1, 2, 3]
    assert [step for step, _ in gap["val/k4_own_minus_foreign"]] == [0, 2]  # the held-out curve, across the resume
    assert (tmp_path / "resumed" / "content_gap.png").read_bytes()[:4] == b"\x89PNG"
    recorded = json.loads((tmp_path / "straight" / "checkpoint" / "train_config.json").read_text())
    assert recorded["objective"] == "read" and recorded["objectives"]["qa_read"]
    assert recorded["contrast"] == 2 and recorded["margin"] == 0.5
    assert recorded["row_base"] == "token"  # the recipe's rows start as the kept tokens
    assert recorded["val_tokens"] == 256  # the held-out curve in a longer layout than the samples'


def test_a_read_run_with_recent_raw_chunks_resumes_exactly(tiny_path, tmp_path):
    books = tmp_path / "books"
    books.mkdir()
    (books / "one.txt").write_text(words(3, 400))
    (books / "two.txt").write_text(words(4, 400))
    tiny = ["--model", str(tiny_path), "--init-from", "", "--data", str(books), "--exclude", "--qa", "--layers", "2",
            "--chunk", "32", "--sample-tokens", "128", "--recent-chunks", "2", "--reconstruct", "0.5",
            "--target-tokens", "8", "--focus", "4", "--ks", "4", "--row-mlp", "16", "--batch-size", "2", "--steps", "3",
            "--save-every", "1", "--val-every", "0"]  # the recipe measures the held-out books: not here (below)
    assert read_recipe([*tiny, "--out", str(tmp_path / "straight")]) == 0
    assert read_recipe([*tiny, "--out", str(tmp_path / "resumed"), "--stop-at", "1"]) == 0
    assert read_recipe([*tiny, "--out", str(tmp_path / "resumed")]) == 0
    a, b = (load_file(tmp_path / run / "checkpoint" / "plugin" / "embedder.safetensors") for run in ("straight", "resumed"))
    assert all(torch.equal(a[key], b[key]) for key in a)
    recorded = json.loads((tmp_path / "straight" / "checkpoint" / "train_config.json").read_text())
    assert recorded["objective"] == "read" and recorded["recent_chunks"] == 2 and recorded["focus"] == 4

    # the held-out measurement (--val-every) draws nothing at random: a run measured every step trains the same
    held_out = tmp_path / "held_out"
    held_out.mkdir()
    (held_out / "three.txt").write_text(words(5, 400))
    (held_out / "four.txt").write_text(words(6, 400))
    val = ["--val-data", str(held_out), "--val-every", "1", "--val-samples", "2"]
    assert read_recipe([*tiny, *val, "--out", str(tmp_path / "measured"), "--stop-at", "1"]) == 0
    assert read_recipe([*tiny, *val, "--out", str(tmp_path / "measured")]) == 0
    c = load_file(tmp_path / "measured" / "checkpoint" / "plugin" / "embedder.safetensors")
    assert all(torch.equal(a[key], c[key]) for key in a)
    gap = plot_content_gap(tmp_path / "measured")
    assert [step for step, _ in gap["val/k4_own_minus_foreign"]] == [0, 1, 2, 3]  # from the plug-in it starts with
    assert gap["val/k4_own_minus_foreign"][0][1] != gap["val/k4_own_minus_foreign"][-1][1]  # the plug-in moved


def test_val_tokens_measures_a_longer_layout_than_the_run_trains_on(tiny_path, tmp_path):
    from extensible.training import TrainConfig, Trainer

    for name, seed in (("one", 11), ("two", 12)):
        (tmp_path / f"{name}.txt").write_text(words(seed, 400))
    config = dict(data=[str(tmp_path)], out=str(tmp_path / "out"), model=str(tiny_path), num_layers=2, chunk_size=32,
                  sample_tokens=128, recent_chunks=2, ks=[4], objective="read", target_tokens=8, batch_size=2,
                  val_data=[str(tmp_path)], val_every=10, val_samples=1)
    for val_tokens, evidence_chunks in ((0, 1), (256, 5)):  # 4 or 8 chunks: the last predicted, 2 raw before it
        held_out = Trainer(TrainConfig(**config, val_tokens=val_tokens), progress=False).held_out
        assert [len(sample.evidence) for sample in held_out] == [evidence_chunks] * 2
        assert [len(sample.after) for sample in held_out] == [2 * 32] * 2 and len(held_out[0].target) == 8


def test_the_held_out_set_alternates_documents_so_that_the_next_sample_is_foreign(tiny, tmp_path):
    from extensible.data import spread_samples

    _, tokenizer = tiny
    texts = {"a.txt": words(7, 300), "b.txt": words(8, 300), "c.txt": words(9, 8)}  # c holds no whole sample
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
    ids = {name: tokenizer(text, add_special_tokens=False)["input_ids"] for name, text in texts.items()}
    assert len(ids["c.txt"]) < 64
    samples = spread_samples(tokenizer, [str(tmp_path)], 64, per_document=3)
    assert samples.shape == (6, 64)
    assert samples[0].tolist() == ids["a.txt"][:64] and samples[1].tolist() == ids["b.txt"][:64]  # a, b, a, b, ...
    last = (len(ids["a.txt"]) // 64 - 1) * 64
    assert samples[4].tolist() == ids["a.txt"][last : last + 64]  # spread to the document's last whole sample
    (tmp_path / "d.txt").write_text(words(10, 30))  # two samples long: every document gives two
    assert 2 * 64 <= len(tokenizer(words(10, 30), add_special_tokens=False)["input_ids"]) < 3 * 64
    assert spread_samples(tokenizer, [str(tmp_path)], 64, per_document=3).shape == (6, 64)
    with pytest.raises(UserError, match="needs two documents"):
        spread_samples(tokenizer, [str(tmp_path / "a.txt"), str(tmp_path / "c.txt")], 64, per_document=3)
    with pytest.raises(UserError, match="needs two documents"):  # named twice, still one document
        spread_samples(tokenizer, [str(tmp_path / "a.txt"), str(tmp_path / "a.txt")], 64, per_document=3)


def test_bad_read_settings_are_one_line_errors(tiny_path, tmp_path):
    from extensible.training import TrainConfig

    base = dict(data=[str(tmp_path)], out=str(tmp_path / "out"), model=str(tiny_path), chunk_size=16, sample_tokens=32,
                ks=[2], objective="read", target_tokens=8)
    with pytest.raises(UserError, match="--contrast needs --batch-size >= 2"):
        TrainConfig(**base, contrast=1.0, batch_size=1)
    with pytest.raises(UserError, match="--row-mlp must be >= 0"):
        TrainConfig(**base, row_mlp=-1)
    with pytest.raises(UserError, match="--target-tokens must be in 1..16"):
        TrainConfig(**{**base, "target_tokens": 17})
    with pytest.raises(UserError, match="--focus must be >= 0 and applies to the read objective only"):
        TrainConfig(**{**base, "objective": "ar", "focus": 1.0})
    with pytest.raises(UserError, match="--val-every measures the read objective on --val-data"):
        TrainConfig(**base, val_every=5)
    with pytest.raises(UserError, match="--val-tokens \\(40\\) must be a multiple of --chunk \\(16\\)"):
        TrainConfig(**base, val_tokens=40)
    with pytest.raises(UserError, match="--val-tokens \\(16\\) must be a multiple"):  # one chunk: nothing to predict
        TrainConfig(**base, val_tokens=16)
    with pytest.raises(UserError, match="--val-every must be >= 0"):
        TrainConfig(**base, val_every=5, val_data=[str(tmp_path)], val_samples=0)


def test_the_read_recipe_starts_from_the_shipped_plugin_and_measures_8w_layout():
    from pathlib import Path

    from jobs.read_recipe import CPU, FAR, FAR_CPU, GPU, RECIPE, SHIPPED
    from jobs.train import build_parser

    for sizing in (CPU + FAR + FAR_CPU, GPU + FAR):  # make train-read, make train-read-gpu
        args, _ = build_parser().parse_known_args(RECIPE + sizing)  # the --qa options are train_read's
        assert args.init_from == SHIPPED and (Path(SHIPPED) / "embedder.safetensors").is_file()
        # held out: 8W's layout (context 7680 with a 1,024-token window): 6,656 tokens as rows, 1,024 raw, the target
        assert args.val_tokens - (args.recent_chunks + 1) * args.chunk_size == 7680 - 1024
        assert args.recent_chunks * args.chunk_size == 1024 and 64 in args.ks


def test_the_recall_recipe_is_reconstruction_only_and_excludes_the_gpu_sizing(capsys):
    from jobs.read_recipe import RECALL
    from jobs.train import build_parser

    args = vars(build_parser().parse_args(RECALL))
    assert args["reconstruct"] == 1 and args["distill"] == 0 and args["contrast"] == 0 and args["k_curriculum"] == 300
    assert set(args["exclude"]) >= {"austen_persuasion", "chesterton_thursday", "wells_war_of_the_worlds"}
    assert read_recipe(["--gpu", "--recall"]) == 2 and "--recall is a recipe of its own" in capsys.readouterr().err
    assert read_recipe(["--far", "--recall"]) == 2 and "not with --gpu or --far" in capsys.readouterr().err


def test_token_based_rows_start_as_the_kept_tokens_themselves(tiny):
    llm, tokenizer = tiny
    config = EmbedderConfig(num_layers=2, chunk_size=16, row_mlp=32, row_base="token")
    embedder = ExtensibleEmbedder.from_llm(llm, tokenizer, config)
    ids = torch.tensor([tokenizer(words(3, 20), add_special_tokens=False)["input_ids"][:16]])
    with torch.no_grad():
        assert torch.equal(embedder(ids), llm.get_input_embeddings()(ids))  # what the frozen LLM reads as text
        embedder.row_mlp.down.bias.add_(0.1)  # a trained MLP adds what the body computed to each token
        assert torch.allclose(embedder(ids) - llm.get_input_embeddings()(ids), torch.full((1, 16, 64), 0.1))
    with pytest.raises(UserError, match="needs a row MLP"):
        ExtensibleEmbedder.from_llm(llm, tokenizer, EmbedderConfig(num_layers=2, row_base="token"))
    with pytest.raises(UserError, match="row_base must be one of hidden, token"):
        ExtensibleEmbedder.from_llm(llm, tokenizer, EmbedderConfig(num_layers=2, row_mlp=8, row_base="tokens"))


def test_a_token_based_run_warm_starts_only_the_body_of_a_hidden_based_plugin(tiny, tiny_path, tmp_path):
    from extensible.training import Trainer, TrainConfig

    llm, tokenizer = tiny
    hidden = ExtensibleEmbedder.from_llm(llm, tokenizer, EmbedderConfig(num_layers=2, chunk_size=16, row_mlp=32,
                                                                        lora_rank=4))
    with torch.no_grad():
        for param in (p for p in hidden.parameters() if p.requires_grad):
            param.add_(0.01)  # as if trained: every tensor moved
    hidden.save_pretrained(tmp_path / "hidden")
    (tmp_path / "book.txt").write_text(words(1, 200))
    trainer = Trainer(TrainConfig(data=[str(tmp_path / "book.txt")], out=str(tmp_path / "out"), model=str(tiny_path),
                                  num_layers=2, lora_rank=4, chunk_size=16, sample_tokens=32, ks=[2], objective="read",
                                  target_tokens=8, row_mlp=32, row_base="token", init_from=str(tmp_path / "hidden")),
                      progress=False)
    started = trainer.accelerator.unwrap_model(trainer.embedder).trainable_state_dict()
    stored = hidden.trainable_state_dict()
    assert all(torch.equal(started[name], stored[name]) for name in stored if not name.startswith("row_mlp."))
    assert not started["row_mlp.down.weight"].any()  # the other base's MLP is not carried over: rows start as tokens
