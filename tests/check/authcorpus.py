"""Where the shared test corpus is (for the check-stage tests and bench/auth.py)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def corpus_dir() -> Path | None:
    """$COFFER_CORPUS, else ../shared/corpus beside the repository; None if absent."""
    env = os.environ.get("COFFER_CORPUS")
    path = Path(env) if env else REPO.parent / "shared" / "corpus"
    return path if path.is_dir() else None
