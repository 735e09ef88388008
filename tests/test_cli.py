"""The extemb command line: real runs on a tiny model, and one-line errors for bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import main

TEXT = "It was a bright cold day in April, and the clocks were striking thirteen.\n" * 12  # ~900 tokens


@pytest.fixture
def tiny_args(tiny_path):
    return ["--model", str(tiny_path), "--window", "96", "--chunk", "16", "--layers", "2", "--untrained"]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(TEXT)
    return path


def test_ppl_prints_window_and_extensible_rows(text_file, tiny_args, capsys):
    assert main(["ppl", str(text_file), "--k", "8", "--tail", "32", "--json", *tiny_args]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out.strip().splitlines()[-1])
    assert [row["method"] for row in rows] == ["window", "ext:8"]
    assert rows[0]["context"] == rows[1]["context"] > 96  # longer than the window: part of it is compressed
    assert all(row["ppl"] > 1 and row["tokens"] == 32 for row in rows)


def test_ppl_with_auto_k_picks_the_smallest_that_fits(text_file, tiny_args, capsys):
    assert main(["ppl", str(text_file), "--k", "auto", "--tail", "32", "--context", "400", "--json", *tiny_args]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rows[1]["method"] == "ext:6" and rows[1]["context"] == 400


def test_generate_answers(text_file, tiny_args, capsys):
    assert main(["generate", str(text_file), "--prompt", "What month?", "--max-new-tokens", "5", "--json", *tiny_args]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["input_tokens"] > 96 and 1 <= result["new_tokens"] <= 5 and result["k"] >= 1


@pytest.mark.parametrize(
    "content,extra,message",
    [
        (b"", [], "is empty"),
        (b"\xff\xfe not utf-8 \x80", [], "not UTF-8"),
        (b"short text", [], "needs more than the 32-token tail"),
        (TEXT.encode(), ["--k", "17"], "larger than a chunk"),
        (TEXT.encode(), ["--window", "32"], "--window (32) must be larger than --tail (32)"),
        (TEXT.encode(), ["--k", "2", "--context", "800"], "use k >="),
        (TEXT.encode(), ["--chunk", "128"], "window (96) must be larger than the chunk size (128)"),
    ],
)
def test_bad_input_is_one_line_and_a_nonzero_exit(tmp_path, tiny_args, capsys, content, extra, message):
    path = tmp_path / "doc.txt"
    path.write_bytes(content)
    assert main(["ppl", str(path), "--tail", "32", *tiny_args, *extra]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err


def test_argument_errors_exit_nonzero(text_file, tiny_args):
    with pytest.raises(SystemExit) as exit_info:
        main(["ppl", str(text_file), "--k", "0", *tiny_args])
    assert exit_info.value.code == 2


def test_console_script_runs_as_a_process(tmp_path, tiny_args):
    exe = Path(sys.executable).parent / "extemb"
    missing = subprocess.run([exe, "ppl", str(tmp_path / "absent.txt"), "--tail", "32", *tiny_args],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.strip() == f"extemb: error: no such file: {tmp_path / 'absent.txt'}"
    bad_model = subprocess.run([exe, "ppl", str(tmp_path / "absent.txt"), "--model", str(tmp_path / "nomodel")],
                               capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert bad_model.returncode == 2 and "Traceback" not in bad_model.stderr


def eval_ppl(data, tiny_args, methods="ext:4,foreign:ext:4"):
    return main(["eval-ppl", "--data", str(data), "--context", "200", "--tail", "32", "--samples", "1",
                 "--methods", methods, *tiny_args])


@pytest.mark.parametrize("lengths,message", [((900,), "give --data two or more documents"),
                                             ((900, 60), "need a 232-token donor span")])
def test_eval_ppl_foreign_without_a_donor_is_one_line(tmp_path, tiny_args, capsys, lengths, message):
    for i, n in enumerate(lengths):
        (tmp_path / f"doc{i}.txt").write_text(TEXT[:n])
    assert eval_ppl(tmp_path, tiny_args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0]


def test_eval_ppl_names_every_document_apart(tmp_path, tiny_args, monkeypatch):
    import extensible.evaluate

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "emma.txt").write_text(TEXT[:300] + folder)
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"text": TEXT[:n]}) + "\n" for n in (400, 500)))
    seen = {}

    def fake_evaluate(protocol, documents, *args, **kwargs):
        seen.update(documents)
        return [], {}, {}

    monkeypatch.setattr(extensible.evaluate, "evaluate", fake_evaluate)
    assert eval_ppl(tmp_path, tiny_args, "window") == 0
    assert sorted(seen) == ["a/emma.txt", "b/emma.txt", "qa:0", "qa:1"]
    assert sorted(map(len, seen.values())) == [301, 301, 400, 500]
