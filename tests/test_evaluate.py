"""The perplexity protocol (extemb eval-ppl) on a tiny random Llama."""

import json

import numpy as np
import pytest
import torch

from extensible import UserError
from extensible.evaluate import (Protocol, bootstrap_interval, document_names, donor_span, draw_samples, evaluate,
                                 far_tokens, markdown_report, parse_methods)
from extensible.text import common_tokens, shared_shingles, shingles
from jobs.cli import main


def documents():
    gen = torch.Generator().manual_seed(0)
    return {"long": torch.randint(2, 90, (3000,), generator=gen), "short": torch.randint(2, 90, (300,), generator=gen)}


def test_samples_are_deterministic_and_skip_short_documents():
    a = draw_samples(documents(), 400, 50, 3, seed=1)
    b = draw_samples(documents(), 400, 50, 3, seed=1)
    assert [s.offset for s in a] == [s.offset for s in b] and {s.document for s in a} == {"long"}
    assert all(len(s.ids) == 450 for s in a)
    assert [s.offset for s in draw_samples(documents(), 400, 50, 3, seed=2)] != [s.offset for s in a]
    with pytest.raises(UserError, match="no document has 5050 tokens"):
        draw_samples(documents(), 5000, 50, 1)


@pytest.mark.parametrize("text", ["ext:0", "ext:x", "median", ""])
def test_bad_methods_are_refused(text):
    with pytest.raises(UserError):
        parse_methods(text)


def test_foreign_methods_parse_only_for_eval_ppl():
    methods = parse_methods("window,foreign:ext:4,foreign:ext:adaptive,recall:4,foreign:recall:4,foreign:full",
                            foreign=True)
    assert methods == ["window", "foreign:ext:4", "foreign:ext:adaptive", "recall:4", "foreign:recall:4",
                       "foreign:full"]
    for text, foreign in [("foreign:ext:4", False), ("foreign:full", False), ("foreign:window", True),
                          ("foreign:ext:0", True), ("recall:4", False), ("recall:x", True), ("foreign:recall:0", True)]:
        with pytest.raises(UserError):
            parse_methods(text, foreign=foreign)


def library():
    gen = torch.Generator().manual_seed(1)
    lengths = {"a": 600, "b": 500, "c": 400, "d": 100}
    return {name: torch.randint(2, 90, (n,), generator=gen) for name, n in lengths.items()}


def owners(documents, span):
    """The documents that hold ``span`` somewhere."""
    n = len(span)
    return [name for name, ids in documents.items()
            if any(torch.equal(ids[o : o + n], span) for o in range(len(ids) - n + 1))]


def test_donor_spans_come_from_another_document_and_repeat_with_the_seed():
    docs = library()
    for seed in range(5):
        for context in (50, 200):
            for sample in draw_samples(docs, context, 32, 3, seed):
                donor = donor_span(docs, sample, context, seed)
                assert len(donor) == len(sample.ids) and torch.equal(donor, donor_span(docs, sample, context, seed))
                assert owners(docs, donor) and sample.document not in owners(docs, donor)


def test_a_donor_span_never_repeats_the_samples_text():
    gen = torch.Generator().manual_seed(2)
    own, rest = torch.randint(2, 90, (300,), generator=gen), torch.randint(2, 90, (300,), generator=gen)
    docs = {"a": own, "b": torch.cat([own, rest])}  # b quotes all of a, then goes on
    for seed in range(5):
        for sample in draw_samples({"a": own}, 60, 32, 3, seed):
            donor = donor_span(docs, sample, 60, seed)
            assert shared_shingles(shingles(sample.ids.tolist()), shingles(donor.tolist())) < 0.2
    with pytest.raises(UserError, match="no donor span for 'a' .* shares under 20% of its token 8-grams"):
        short = own[:100]  # every 92-token span of its copy shares most of a sample's 8-grams
        donor_span({"a": short, "copy": short.clone()}, draw_samples({"a": short}, 60, 32, 1)[0], 60)


def test_far_tokens_are_first_seen_before_the_window():
    ids = torch.tensor([7, 8, 9, 5, 6, 6, 7, 9, 8, 7, 9, 3, 8])  # 4 before a 4-token window, then a 5-token tail
    # 8 is first seen before the window (once: its repeat is in the tail), 7 is common, 9 in the window, 3 new
    assert far_tokens(ids, tail=5, window=4, common={7}).tolist() == [True, False, False, False, False]
    assert common_tokens([ids, torch.tensor([7, 7, 8])], 2) == {7, 8}  # 5, 4 and 3 of 7, 8 and 9


def test_foreign_reads_the_donor_rows_and_only_them(tiny_lm):
    docs = library()
    rows, per_sample, far = evaluate(Protocol(tiny_lm), docs, [50, 200], ["window", "full", "ext:4", "foreign:ext:4"],
                                     tail=32, per_document=2, progress=False, common=5)
    assert ("foreign:ext:4", 200) in {(row["method"], row["context"]) for row in rows}
    for i, sample in enumerate(draw_samples(docs, 200, 32, 2)):  # 232 tokens at k=4: 12 chunks compressed
        donor = donor_span(docs, sample, 200)
        expected = tiny_lm.score(sample.ids, 32, 4, full=tiny_lm.encode(donor)).mean_nll
        assert per_sample[("foreign:ext:4", 200)][i] == expected
        mask = far_tokens(sample.ids, 32, tiny_lm.window, common_tokens(docs.values(), 5))
        own = tiny_lm.score(sample.ids, 32, 4).token_nll
        assert mask.any() and far[("ext:4", 200)][i] == pytest.approx(own[mask].mean().item(), rel=1e-6)
    assert not np.allclose(per_sample[("foreign:ext:4", 200)], per_sample[("ext:4", 200)])
    # 82 tokens fit the 96-token window: nothing is compressed, so nothing is foreign
    assert np.array_equal(per_sample[("foreign:ext:4", 50)], per_sample[("ext:4", 50)])
    report = markdown_report(rows, per_sample)
    row = next(line for line in report.splitlines() if line.startswith("| ext:4 - foreign:ext:4 | 200 |"))
    assert row.endswith("% | - |") and "nats/token" in report  # foreign:full not run
    report = markdown_report(rows, per_sample, per_sample_far=far)
    with_far = int((~np.isnan(far[("ext:4", 200)])).sum())  # the samples the far content is measured on
    assert f"| ext:4 - foreign:ext:4 | 200 | {with_far} |" in report and "On the far tokens" in report


def test_foreign_full_reads_the_donors_text_before_the_window_and_the_samples_own_after(tiny_lm):
    docs = library()
    methods = ["window", "full", "foreign:full", "ext:4", "foreign:ext:4"]
    protocol, window = Protocol(tiny_lm), tiny_lm.window
    rows, per_sample, far = evaluate(protocol, docs, [200], methods, tail=32, per_document=2, progress=False, common=5)
    for i, sample in enumerate(draw_samples(docs, 200, 32, 2)):  # 232 tokens: 135 before the window's 96
        donor = donor_span(docs, sample, 200)
        context = torch.cat([donor[: 232 - 1 - window], sample.ids[232 - 1 - window : -1]])
        logits = tiny_lm.llm(context[None]).logits[0, -32:]
        expected = torch.nn.functional.cross_entropy(logits.float(), sample.ids[-32:]).item()
        assert per_sample[("foreign:full", 200)][i] == pytest.approx(expected, abs=1e-4)
        # with the sample as its own donor it is full attention
        own = protocol.score("foreign:full", sample.ids, 32, donor=sample.ids).mean_nll
        assert own == pytest.approx(per_sample[("full", 200)][i], abs=1e-6)
    assert not np.allclose(per_sample[("foreign:full", 200)], per_sample[("full", 200)])
    report = markdown_report(rows, per_sample, per_sample_far=far)
    assert "| full - foreign:full | 200 |" in report
    ext = next(line for line in report.splitlines() if line.startswith("| ext:4 - foreign:ext:4 | 200 |"))
    assert ext.count("% |") == 2  # shares of window - full and of foreign:full - full


def test_recall_scores_the_tail_after_its_own_or_the_donors_rows(tiny_lm):
    docs = library()
    rows, per_sample, _ = evaluate(Protocol(tiny_lm), docs, [50], ["recall:4", "foreign:recall:4"], tail=40,
                                per_document=2, progress=False)
    embed = tiny_lm.llm.get_input_embeddings()
    for i, sample in enumerate(draw_samples(docs, 50, 40, 2)):
        target = sample.ids[-40:-8]  # the tail's two whole 16-token chunks
        for method, source in (("recall:4", target), ("foreign:recall:4", donor_span(docs, sample, 50)[-40:-8])):
            outputs = tiny_lm.embedder(source.view(2, 16))  # by hand: every 4th row of each chunk, then the tokens
            inputs = torch.cat([outputs[0, 3::4], outputs[1, 3::4], embed(target[:-1])])[None]
            logits = tiny_lm.llm(inputs_embeds=inputs).logits[0, -32:]
            expected = torch.nn.functional.cross_entropy(logits.float(), target).item()
            assert per_sample[(method, 50)][i] == pytest.approx(expected, abs=1e-4)
    report = markdown_report(rows, per_sample)
    assert "| recall:4 - foreign:recall:4 | 50 |" in report and "against `window`" not in report  # window not run
    with pytest.raises(UserError, match="at least the chunk size"):
        evaluate(Protocol(tiny_lm), docs, [50], ["recall:4"], tail=8, progress=False)
    with pytest.raises(UserError, match="recall:1: 5 chunks read as rows and then as tokens do not fit --window 96"):
        evaluate(Protocol(tiny_lm), docs, [50], ["recall:1"], tail=90, progress=False)
    with pytest.raises(UserError, match="at most the chunk size"):
        evaluate(Protocol(tiny_lm), docs, [50], ["recall:32"], tail=32, progress=False)


@pytest.mark.parametrize("lengths,message", [({"a": 600}, "give --data two or more documents"),
                                             ({"a": 600, "b": 100}, "need a 232-token donor span")])
def test_foreign_without_a_donor_is_refused_before_scoring(tiny_lm, lengths, message):
    docs = {name: torch.randint(2, 90, (n,)) for name, n in lengths.items()}
    with pytest.raises(UserError, match=message):
        evaluate(Protocol(tiny_lm), docs, [200], ["ext:4", "foreign:ext:4"], tail=32, progress=False)


def test_document_names_are_unique_and_readable():
    sources = ["/d/a/emma.txt", "/d/b/emma.txt", "/d/moby.txt", "/d/emma.md", "/d/qa.jsonl:0", "/d/qa.jsonl:3"]
    assert document_names(sources) == ["a/emma.txt", "b/emma.txt", "moby", "emma.md", "qa:0", "qa:3"]


def test_baselines_agree_where_they_must(tiny_lm):
    protocol = Protocol(tiny_lm)
    ids = documents()["long"][:90]  # fits the 96-token window and the positions
    full = protocol.score("full", ids, 30).token_nll
    assert torch.allclose(protocol.score("window", ids, 30).token_nll, full, atol=1e-5)
    assert torch.allclose(protocol.score("streaming", ids, 30).token_nll, full, atol=1e-5)
    assert torch.allclose(protocol.score("pi", ids, 30).token_nll, full, atol=1e-5)  # factor 1: plain RoPE


def test_evaluate_rows_report_and_skips(tiny_lm):
    protocol = Protocol(tiny_lm)
    assert "exceed the LLM's 2048 positions" in protocol.applicable("full", 2132)
    assert protocol.applicable("pi", 2132) is None
    rows, per_sample, _ = evaluate(protocol, documents(), [200, 1000], ["window", "full", "streaming", "pi", "ntk",
                                "ext:4", "ext:adaptive"], tail=32, per_document=2, progress=False)
    got = {(row["method"], row["context"]) for row in rows}
    assert {("pi", 1000), ("ntk", 1000), ("ext:adaptive", 1000), ("window", 200), ("full", 1000)} <= got
    assert ("ext:4", 1000) not in got, "k=4 cannot hold 1032 tokens in a 96-token window"
    adaptive = next(row for row in rows if row["method"] == "ext:adaptive" and row["context"] == 1000)
    assert adaptive["k"] > 4 and adaptive["tokens"] == 2 * 32 and adaptive["ppl"] > 1
    report = markdown_report(rows, per_sample)
    assert "| ext:adaptive |" in report and "95% interval" in report


def test_bootstrap_interval_covers_a_clear_shift():
    shifted = np.full(20, -1.0) + np.random.default_rng(0).normal(0, 0.1, 20)
    low, high = bootstrap_interval(shifted)
    assert low < shifted.mean() < high < 0 and high - low < 0.2
    low, high = bootstrap_interval(np.random.default_rng(1).normal(0, 0.1, 20))
    assert low < 0 < high, "no shift: the interval straddles zero"


def test_cli_eval_ppl_writes_json_table_and_plot(tmp_path, tiny_path):
    data = tmp_path / "books"
    data.mkdir()
    (data / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 30)
    out = tmp_path / "eval" / "ppl.json"
    argv = ["eval-ppl", "--data", str(data), "--context", "100", "300", "--tail", "32", "--samples", "1",
            "--methods", "window,ext:4,ext:adaptive", "--json", str(out), "--model", str(tiny_path), "--window", "96",
            "--chunk", "16", "--layers", "2", "--untrained"]
    assert main(argv) == 0
    rows = json.loads(out.read_text())
    assert {tuple(sorted(row)) for row in rows} == {("context", "far_nll", "far_tokens", "k", "method", "ppl", "samples",
                                                    "seconds", "tokens")}
    assert out.with_suffix(".png").stat().st_size > 1000 and "| window |" in out.with_suffix(".md").read_text()
    argv[argv.index("--methods") + 1] = "window,ext:0"
    assert main(argv) == 2
