"""The built-in scorer: heuristics and the classifier on one message (no I/O but
the token database).  The stage adds DNS blocklists and external scanners."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.check.spam import heuristics
from gateway.check.spam.bayes import Classification, TokenStore, digest, tokenize
from gateway.check.spam.config import SpamConfig
from gateway.check.spam.message import ParsedMessage, parse
from gateway.check.spam.symbols import Scan, Thresholds
from gateway.mailparse import ValueMemo

# How the classifier's probability p becomes a weight (measured by 2-fold
# cross-validation on the train split of the SpamAssassin corpus, bench/spam.py):
# BAYES_SPAM rises linearly from 0 at p = BAYES_SPAM_FROM to its full weight (12)
# at p = 1, so p >= 0.7 alone makes a message spam (6), but the classifier alone
# never reaches reject (15): that needs other evidence too.  Chi-square combining
# puts mixed evidence near 0.5, and on that data such "unsure" messages are more
# often spam than ham, hence a start below 0.5.  BAYES_HAM falls to its full weight (-3) at p = 0.
BAYES_SPAM_FROM = 0.40
BAYES_HAM_UNTIL = 0.20


@dataclass(frozen=True, slots=True)
class Verdict:
    score: float
    verdict: str  # "spam" | "ham"
    action: str  # "reject" | "quarantine" | "no action"
    symbols: dict[str, float]
    details: dict[str, str]
    bayes: float | None  # the classifier's probability, None when not used

    def to_facts(self) -> dict[str, Any]:
        facts: dict[str, Any] = {
            "score": self.score, "verdict": self.verdict, "action": self.action,
            "symbols": dict(self.symbols),
        }
        if self.bayes is not None:
            facts["bayes"] = round(self.bayes, 4)
        return facts

    def header(self, thresholds: Thresholds) -> str:
        """X-Spam-Status in SpamAssassin's form: "Yes, score=7.1 required=6.0 tests=A,B"."""
        yes = "Yes" if self.verdict == "spam" else "No"
        line = f"{yes}, score={self.score:.1f} required={thresholds.quarantine:.1f} tests="
        key = (line, tuple(sorted(self.symbols)) or ("none",))
        value = _HEADERS.get(key)
        if value is None:
            value = _HEADERS.keep(key, _fold_tests(*key))
        return value


# Folded X-Spam-Status values by (first line, test names): a few scores and symbol
# sets recur from message to message (the symbols are a fixed set, the score is
# rounded to a tenth), and folding costs more than the look-up.
_HEADERS: ValueMemo[tuple[str, tuple[str, ...]], str] = ValueMemo()


def _fold_tests(line: str, names: tuple[str, ...]) -> str:
    # RFC 5322 §2.1.1: keep lines short; fold between test names
    lines = [line]
    for i, name in enumerate(names):
        piece = name + ("," if i < len(names) - 1 else "")
        if len(lines[-1]) + len(piece) > 72 and not lines[-1].endswith("="):
            lines.append("\t" + piece)
        else:
            lines[-1] += piece
    return "\r\n".join(lines)

def bayes_symbol(scan: Scan, c: Classification) -> None:
    if not c.ready or not c.clues:
        return
    p = c.probability
    detail = f"probability {p:.3f}"
    if p > BAYES_SPAM_FROM:
        scan.add("BAYES_SPAM", detail, scale=(p - BAYES_SPAM_FROM) / (1 - BAYES_SPAM_FROM))
    elif p < BAYES_HAM_UNTIL:
        scan.add("BAYES_HAM", detail, scale=(BAYES_HAM_UNTIL - p) / BAYES_HAM_UNTIL)


class Scorer:
    def __init__(self, config: SpamConfig | None = None, store: TokenStore | None = None) -> None:
        self.config = config or SpamConfig()
        self.store = store
        self.thresholds = Thresholds(self.config.thresholds.quarantine,
                                     self.config.thresholds.reject)

    @classmethod
    def from_config(cls, cfg: Any) -> Scorer:
        from gateway.check.spam.config import spam_config_of

        spam = spam_config_of(cfg)
        store = None
        if spam.bayes.enabled:
            db = spam.bayes.db
            store = TokenStore(db if db.is_absolute() else Path(cfg.data_dir) / db)
        return cls(spam, store)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    def new_scan(self) -> Scan:
        return Scan(weights=self.config.symbols)

    def parse(self, data: bytes) -> ParsedMessage:
        return parse(data, self.config.max_size)

    def local(self, pm: ParsedMessage, scan: Scan, *, check: Mapping[str, Any] | None = None,
              now: float | None = None) -> float | None:
        """Heuristics and classifier into ``scan``; returns the Bayes probability used."""
        heuristics.evaluate(pm, scan, check=check, now=time.time() if now is None else now)
        if self.store is None:
            return None
        model, min_learned = self.store.model(), self.config.bayes.min_learned
        if model.nspam < min_learned or model.nham < min_learned:
            # Not trained enough to be used (Model.classify would say not ready, and
            # bayes_symbol adds nothing): skip tokenizing, most of the classifier's CPU.
            return None
        c = model.classify(tokenize(pm), min_learned)
        bayes_symbol(scan, c)
        return c.probability if c.ready and c.clues else None

    def verdict(self, scan: Scan, bayes: float | None) -> Verdict:
        score = scan.score
        action = self.thresholds.action(score)
        return Verdict(score, "spam" if action != "no action" else "ham", action,
                       dict(sorted(scan.symbols.items())), dict(scan.details), bayes)

    def score(self, data: bytes, *, check: Mapping[str, Any] | None = None,
              now: float | None = None) -> Verdict:
        """Heuristics and classifier on one message (blocking; no DNS)."""
        scan = self.new_scan()
        bayes = self.local(self.parse(data), scan, check=check, now=now)
        return self.verdict(scan, bayes)

    def learn(self, messages: list[tuple[bytes, bool]], *, at: float = 0.0) -> int:
        """Teach the classifier: (message, is_spam) pairs, in one transaction."""
        if self.store is None:
            from gateway.check.spam.bayes import BayesError

            raise BayesError("the classifier is off (spam.bayes.enabled: false)")
        items = ((digest(d), s, tokenize(self.parse(d))) for d, s in messages)
        return self.store.learn(items, at=at)
