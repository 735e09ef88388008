"""The perplexity protocol (extemb eval-ppl) on a tiny random Llama."""

import json

import numpy as np
import pytest
import torch

from extensible import UserError
from extensible.evaluate import Protocol, bootstrap_interval, draw_samples, evaluate, markdown_report, parse_methods
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
    rows, per_sample = evaluate(protocol, documents(), [200, 1000], ["window", "full", "streaming", "pi", "ntk",
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
    assert {tuple(sorted(row)) for row in rows} == {("context", "k", "method", "ppl", "samples", "seconds", "tokens")}
    assert out.with_suffix(".png").stat().st_size > 1000 and "| window |" in out.with_suffix(".md").read_text()
    argv[argv.index("--methods") + 1] = "window,ext:0"
    assert main(argv) == 2
