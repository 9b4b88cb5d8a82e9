"""Policy engine benchmark: prints one JSON line.

    .venv/bin/python bench/policy.py [--corpus DIR] [--rounds N]

* ``median_ms``: evaluating a 200-rule policy (envelope, header, subject,
  attachment and verdict conditions; no body scanning) on each message of the
  MIME corpus, the message already parsed — issue 5 asks for under 1 ms.
* ``parse_median_ms``: building the MessageView once per message (shared by
  all rules).
* ``dlp_mb_per_s``: body DLP (cards, IBAN, SSN, a keyword dictionary, a custom
  regex, all five per message) over synthetic business prose of growing size
  with a finding every ~2 KB; equal rates at every size show the scan is linear.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway.envelope import Envelope  # noqa: E402
from policies.engine import evaluate  # noqa: E402
from policies.loader import load_policy  # noqa: E402
from policies.message import MessageView  # noqa: E402

TEMPLATES = [
    "{{sender.domain: {{in: partners}}}}",
    "{{recipient.domain: d{i}.example}}",
    "{{header.X-Tag-{i}: {{exists: true}}}}",
    "{{subject: {{contains: 'word{i}'}}}}",
    "{{subject: {{regex: '^\\[ticket-{i}\\]'}}}}",
    "{{attachment.extension: [exe{i}, scr]}}",
    "{{attachment: {{detected_type: application/x-msdownload, size: {{gt: {i}k}}}}}}",
    "{{all: [{{direction: inbound}}, {{spam.score: {{ge: {i}}}}}]}}",
    "{{any: [{{dmarc: fail}}, {{spf: softfail}}, {{client_ip: 10.{i}.0.0/16}}]}}",
    "{{from.address: {{glob: 'user{i}@*'}}}}",
]
ACTIONS = [
    "[{{add_header: {{name: X-Rule-{i}, value: hit}}}}]",
    "[{{tag_subject: '[R{i}]'}}]",
    "[quarantine]",
    "[{{retain: {i}d}}]",
    "[{{encrypt: {{method: auto}}}}]",
]


def policy_200(directory: Path) -> Path:
    lines = ["version: 1", "lists:", "  partners: [p1.example, '*.p2.example']", "rules:"]
    for i in range(200):
        cond = TEMPLATES[i % len(TEMPLATES)].format(i=i)
        act = ACTIONS[i % len(ACTIONS)].format(i=i + 1)
        lines += [f"  - name: rule-{i}", f"    when: {cond}", f"    then: {act}"]
    path = directory / "bench-200.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


DLP_POLICY = """
version: 1
lists:
  words: [confidential, "project falcon", merger, acquisition, "insider", "salary"]
rules:
  - {name: cards, when: {dlp: {detector: credit_card, scope: body}}, then: [quarantine]}
  - {name: iban, when: {dlp: {detector: iban, scope: body}}, then: [quarantine]}
  - {name: ssn, when: {dlp: {detector: us_ssn, scope: body}}, then: [quarantine]}
  - {name: words, when: {dlp: {detector: keywords, list: words, scope: body}}, then: [quarantine]}
  - {name: ids, when: {dlp: {detector: regex, pattern: 'EMP-\\d{6}', scope: body}},
     then: [quarantine]}
"""


def synthetic_text(size: int, seed: int = 5) -> str:
    """Business prose with a sensitive value (card, IBAN, SSN, keyword, id) every ~2 KB."""
    rnd = random.Random(seed)
    words = ["the", "report", "account", "payment", "number", "quarterly", "figures", "and",
             "of", "meeting", "customer", "invoice", "2025", "total", "12.50", "please",
             "review", "attached", "regards", "team", "order", "delivery", "March", "status"]
    sensitive = ["4111 1111 1111 1111", "DE89 3704 0044 0532 0130 00", "536-22-8726",
                 "merger", "EMP-123456"]
    out: list[str] = []
    n = since = 0
    while n < size:
        w = rnd.choice(words)
        if since > 2048:
            w, since = rnd.choice(sensitive), 0
        out.append(w)
        n += len(w) + 1
        since += len(w) + 1
    return " ".join(out)[:size]


def corpus_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    root = Path(os.environ.get("COFFER_CORPUS") or REPO.parent / "shared" / "corpus")
    return root / "mime"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--corpus")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    corpus = corpus_dir(args.corpus)
    files = sorted(p for p in corpus.rglob("*") if p.is_file()) if corpus.is_dir() else []
    if not files:
        print(json.dumps({"bench": "policy", "error": f"no corpus at {corpus}"}))
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        policy = load_policy(policy_200(Path(tmp)))
        (Path(tmp) / "dlp.yaml").write_text(DLP_POLICY, encoding="utf-8")
        dlp = load_policy(Path(tmp) / "dlp.yaml")
    env = Envelope("sender@outside.example", ["user@example.com"], client_ip="192.0.2.1")
    facts = {"check": {"spf": {"result": "pass"}, "dmarc": {"result": "pass"}},
             "spam": {"score": 1.0, "verdict": "ham"}}

    parse_ms: list[float] = []
    views = []
    for path in files:
        raw = path.read_bytes()
        t0 = time.perf_counter()
        views.append(MessageView.from_bytes(raw))
        parse_ms.append((time.perf_counter() - t0) * 1000)

    eval_ms: list[float] = []
    for _ in range(args.rounds):
        for view in views:
            t0 = time.perf_counter()
            evaluate(policy, env, view, facts, local_domains=["example.com"])
            eval_ms.append((time.perf_counter() - t0) * 1000)
    eval_ms.sort()

    rates = {}
    for mb in (1, 4, 16):
        text = synthetic_text(mb * 1024 * 1024)
        best = float("inf")
        for _ in range(2):
            view = MessageView(size=len(text), body_text=text)  # fresh: DLP results are cached
            t0 = time.perf_counter()
            evaluate(dlp, env, view, {})
            best = min(best, time.perf_counter() - t0)
        rates[f"{mb}MB"] = round(mb / best, 2)

    print(json.dumps({
        "bench": "policy",
        "rules": len(policy.rules),
        "messages": len(files),
        "median_ms": round(statistics.median(eval_ms), 4),
        "p95_ms": round(eval_ms[int(len(eval_ms) * 0.95) - 1], 4),
        "parse_median_ms": round(statistics.median(parse_ms), 4),
        "dlp_detectors": len(dlp.rules),
        "dlp_mb_per_s": rates,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
