"""Messages for the spam tests, built in the tests (never copied from the corpus)."""

from __future__ import annotations

import random
from pathlib import Path

NOW = 1_780_000_000.0  # 2026-05-28, the clock of the Date rules
DATE = "Thu, 28 May 2026 10:00:00 +0000"


def message(
    body: str = "Hello Bob,\n\nthe meeting is moved to Thursday.\n\nAlice\n",
    *,
    headers: dict[str, str] | None = None,
    drop: tuple[str, ...] = (),
    content_type: str = "text/plain; charset=us-ascii",
    extra: str = "",
) -> bytes:
    """A plain, well-formed message; ``headers`` replace or add fields, ``drop`` removes."""
    base = {
        "From": "Alice Example <alice@example.com>",
        "To": "bob@example.org",
        "Subject": "Meeting on Thursday",
        "Date": DATE,
        "Message-ID": "<20260528100000.1234@mail.example.com>",
        "MIME-Version": "1.0",
        "Content-Type": content_type,
    }
    base.update(headers or {})
    lines = [f"{k}: {v}" for k, v in base.items() if k not in drop]
    body = body.replace("\r\n", "\n").replace("\n", "\r\n")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n" + body).encode()


def multipart(parts: list[tuple[str, str, str]], *, headers: dict[str, str] | None = None,
              boundary: str = "b1", close: bool = True) -> bytes:
    """(content-type, extra part headers, body) parts in multipart/mixed."""
    chunks = []
    for ctype, extra, body in parts:
        chunks.append(f"--{boundary}\r\nContent-Type: {ctype}\r\n{extra}\r\n{body}\r\n")
    end = f"--{boundary}--\r\n" if close else ""
    return message("".join(chunks) + end, headers=headers,
                   content_type=f'multipart/mixed; boundary="{boundary}"')


def corpus_subset(root: Path, split: str, kind: str, n: int, seed: int = 9) -> list[bytes]:
    """``n`` files of spam-ham/SPLIT/KIND, a fixed random sample."""
    files = sorted((root / "spam-ham" / split / kind).iterdir())
    rng = random.Random(seed)
    return [p.read_bytes() for p in rng.sample(files, min(n, len(files)))]
