"""The SQuAD articles split into the ones the QA training stage reads and the ones held out for evaluation.

Seven articles (every fifth in the file's order) are held out; the model card names them. The files are written
under ``--out`` (never into the repository: the data stays in ../shared/data)::

    python -m jobs.qa_split --data ../shared/data/qa/squad_articles.jsonl --out out/qa
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SQUAD_HELD_OUT = ("1973_oil_crisis", "Computational_complexity_theory", "Fresno,_California", "Immune_system",
                  "Martin_Luther", "Packet_switching", "Steam_engine")


def is_held_out(record: dict) -> bool:
    return record.get("source", "").split(":")[-1] in SQUAD_HELD_OUT


def split(data: Path, out: Path) -> tuple[Path, Path]:
    lines = [line for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    held = [line for line in lines if is_held_out(json.loads(line))]
    if len(held) != len(SQUAD_HELD_OUT):
        raise SystemExit(f"{data}: found {len(held)} of the {len(SQUAD_HELD_OUT)} held-out articles")
    out.mkdir(parents=True, exist_ok=True)
    train, test = out / "squad_train.jsonl", out / "squad_heldout.jsonl"
    train.write_text("".join(line + "\n" for line in lines if line not in held))
    test.write_text("".join(line + "\n" for line in held))
    return train, test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/qa/squad_articles.jsonl")
    parser.add_argument("--out", default="out/qa")
    args = parser.parse_args()
    for path in split(Path(args.data), Path(args.out)):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
