"""Recorded verdicts of the spam scorer on the shared corpus (the differential test's
reference).

``cases/corpus-verdicts.json.gz`` holds, for every message of the corpus' spam-ham
and mime folders, what the scorer said when the file was recorded: score, action,
symbols with their weights, a digest of the details, the classifier's probability
(a model trained on the train split), a digest of the whole ParsedMessage (which
every rule and the tokenizer read) and one of the classifier's tokens.  Speed-ups
of the scorer must keep all of it exactly; a deliberate change of a rule re-records
it:

    PYTHONPATH=. .venv/bin/python tests/check/spam/corpusverdicts.py

(run on the commit whose behaviour is the reference, from the checkout's top: with
PYTHONPATH the checkout's own packages are imported, not those the virtualenv's
editable install points at, which may be another worktree).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RECORD = Path(__file__).parent / "cases" / "corpus-verdicts.json.gz"
FOLDERS = ("spam-ham", "mime")
NOW = 1_780_000_000.0  # the clock of the Date rules when no Received date is found
CHECK = {"spf": {"result": "softfail"}, "dkim": [{"result": "pass"}],
         "dmarc": {"result": "fail", "disposition": "quarantine", "domain": "example.com"}}


def corpus_files(root: Path) -> Iterator[tuple[str, Path]]:
    """(name relative to the corpus, path) of every message file, in a stable order."""
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and not path.name.upper().startswith(("LICENSE", "COPYING")):
                yield path.relative_to(root).as_posix(), path


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def trained_scorer(root: Path, db: Path) -> Any:
    """A Scorer whose classifier learned the corpus' train split (in ``db``)."""
    from gateway.check.spam.bayes import TokenStore
    from gateway.check.spam.scorer import Scorer

    scorer = Scorer(store=TokenStore(db))
    items = [(p.read_bytes(), kind == "spam")
             for kind in ("ham", "spam")
             for p in sorted((root / "spam-ham" / "train" / kind).iterdir())]
    scorer.learn(items)
    return scorer


def verdict_of(scorer: Any, data: bytes) -> dict[str, Any]:
    """What is recorded of one message."""
    from gateway.check.spam.bayes import tokenize

    pm = scorer.parse(data)
    v = scorer.score(data, check=CHECK, now=NOW)
    return {
        "score": v.score, "action": v.action, "symbols": v.symbols,
        "details": _digest(json.dumps(v.details, sort_keys=True)),
        "bayes": v.bayes, "parsed": _digest(repr(pm)),
        "tokens": _digest("\n".join(sorted(tokenize(pm)))),
    }


def record(root: Path, db: Path) -> dict[str, dict[str, Any]]:
    scorer = trained_scorer(root, db)
    try:
        return {name: verdict_of(scorer, path.read_bytes())
                for name, path in corpus_files(root)}
    finally:
        scorer.close()


def load() -> dict[str, dict[str, Any]]:
    with gzip.open(RECORD, "rt", encoding="utf-8") as f:
        out: dict[str, dict[str, Any]] = json.load(f)
    return out


def main() -> None:
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from authcorpus import corpus_dir

    root = corpus_dir()
    if root is None:
        sys.exit("corpus not found")
    with tempfile.TemporaryDirectory() as tmp:
        verdicts = record(root, Path(tmp) / "bayes.sqlite")
    # mtime=0: the same verdicts give the same bytes
    with open(RECORD, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(json.dumps(verdicts, sort_keys=True, indent=0).encode())
    print(f"{len(verdicts)} verdicts -> {RECORD}")


if __name__ == "__main__":
    main()
