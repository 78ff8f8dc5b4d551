"""Split the shipped Debian Reference (Italian) into one JSONL record per numbered section.

usage: python examples/prepare_corpus.py OUT.jsonl
Each section ("3.5. La dimensione dei pacchetti" up to the next such heading) becomes a document, so
the corpus has ~170 documents and packing must keep them apart.
"""

from __future__ import annotations

import gzip
import json
import re
import sys
from pathlib import Path

SRC = Path(__file__).parent / "data" / "debian-reference.it.txt.gz"
HEADING = re.compile(
    r"^\d+\.\d+\.\s\S"
)  # headings use no-break spaces; at column 0, e.g. "3.5. La dimensione"


def sections(text: str) -> list[str]:
    lines = text.splitlines()
    # the body starts at the first chapter; what precedes it is the table of contents
    start = next(i for i, ln in enumerate(lines) if re.match(r"^Capitolo\s1\.", ln))
    docs, cur = [], []
    for ln in lines[start:]:
        if HEADING.match(ln) and cur:
            docs.append("\n".join(cur).strip())
            cur = []
        cur.append(ln)
    docs.append("\n".join(cur).strip())
    return [d for d in docs if len(d) > 200]


def main() -> None:
    out = Path(sys.argv[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    docs = sections(gzip.decompress(SRC.read_bytes()).decode("utf-8"))
    with open(out, "w") as fh:
        for d in docs:
            fh.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    print(f"{len(docs)} sections, {sum(map(len, docs)):,} characters -> {out}")


if __name__ == "__main__":
    main()
