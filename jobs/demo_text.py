"""Write the demo documents: all pydoc topics as one long file, and the topics on statements as a shorter one."""

import sys
from pathlib import Path

from pipeline.corpus import pydoc_topics


def main(out_dir: str) -> None:
    topics = pydoc_topics()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pydoc_topics.txt").write_text("\n\n".join(topics.values()))
    statements = ["if", "while", "for", "try", "with", "def", "class", "return", "import", "assert"]
    (out / "pydoc_statements.txt").write_text("\n\n".join(topics[name] for name in statements if name in topics))
    print(f"wrote {out / 'pydoc_topics.txt'} and {out / 'pydoc_statements.txt'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/demo")
