"""The scoring model (rspamd's): named symbols with weights, actions by thresholds.

Every contribution to a message's score is a *symbol*: a name (``MISSING_DATE``,
``BAYES_SPAM``, ``RBL_ZEN``), a weight (positive: spammy, negative: hammy) and
an optional detail for the operator.  The score is the sum of the weights, so a
verdict is always explainable: the symbols that fired are stored with the
message (``facts["spam"]["symbols"]``) and a policy can test any of them.

The score maps to an *action* by thresholds, as rspamd's ``actions`` do::

    score >= reject      "reject"      (a policy may refuse it at SMTP time)
    score >= quarantine  "quarantine"  (rspamd's "add header": the verdict is spam)
    otherwise            "no action"   (ham)

Coffer has no greylisting: rspamd's "greylist" action has no counterpart.  The
action is advice; the policy decides what is done (the stage never rejects).

Default weights live in :data:`SYMBOLS`; the ``spam.symbols`` section of
coffer.yaml overrides them by name (weight 0: reported, not scored).  A symbol
whose weight depends on the message (Bayes probability, an external scanner's
score) has its *maximum* weight here, scaled by the rule that adds it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

SpamAction = Literal["reject", "quarantine", "no action"]


@dataclass(frozen=True, slots=True)
class SymbolDef:
    weight: float
    description: str
    group: str


def _d(weight: float, description: str, group: str) -> SymbolDef:
    return SymbolDef(weight, description, group)


# The built-in symbols, by group.  Weights were tuned on the train split of the
# SpamAssassin public corpus (bench/spam.py) so that a heuristic alone rarely
# makes ham spam: the weights of structure rules stay well below the quarantine
# threshold, and only combinations (or the classifier) cross it.
SYMBOLS: dict[str, SymbolDef] = {
    # -- headers (heuristics.py) --
    "MISSING_DATE": _d(1.0, "no Date header (RFC 5322 §3.6 requires one)", "headers"),
    "MISSING_MID": _d(1.0, "no Message-ID header (RFC 5322 §3.6.4 says SHOULD)", "headers"),
    "MISSING_FROM": _d(2.0, "no From header (RFC 5322 §3.6 requires one)", "headers"),
    "MISSING_TO": _d(0.0, "no To header and no Cc", "headers"),
    "MISSING_SUBJECT": _d(0.1, "no Subject header", "headers"),
    "INVALID_DATE": _d(1.5, "Date header that cannot be parsed", "headers"),
    "DATE_IN_FUTURE": _d(0.5, "Date more than 12 hours after the message was received",
                         "headers"),
    "DATE_IN_PAST": _d(0.5, "Date more than 4 days before the message was received", "headers"),
    "INVALID_MSGID": _d(1.5, "Message-ID not of the form <left@right>", "headers"),
    "MULTIPLE_FROM": _d(2.0, "several From headers or addresses", "headers"),
    "FROM_NO_ADDRESS": _d(1.5, "From without a parseable address", "headers"),
    "REPLYTO_DIFF_DOMAIN": _d(0.0, "Reply-To in another organizational domain than From",
                              "headers"),
    "FROM_DISPLAY_ADDR_MISMATCH": _d(2.0, "From display name is an address of another domain",
                                     "headers"),
    "TO_EQ_FROM": _d(0.5, "To is the From address", "headers"),
    "TO_UNDISCLOSED": _d(1.0, "To: undisclosed recipients", "headers"),
    "MANY_RCPTS_VISIBLE": _d(1.5, "more than 15 recipients listed in To/Cc", "headers"),
    "SUBJ_ALL_CAPS": _d(1.5, "Subject in capitals", "headers"),
    "SUBJ_EXCESS_PUNCT": _d(0.8, "Subject with !!! or $$$", "headers"),
    "RAW_8BIT_HEADER": _d(0.8, "unencoded 8-bit bytes in a header (RFC 2047 not used)",
                          "headers"),
    # -- structure and content --
    "HTML_ONLY": _d(1.0, "HTML body without a text/plain alternative", "content"),
    "HTML_SHORT_WITH_IMAGE": _d(1.5, "HTML with an image and little text", "content"),
    "URL_TEXT_MISMATCH": _d(1.0, "link text shows another domain than the link goes to", "url"),
    "URL_IP_LITERAL": _d(2.5, "link to an IP address", "url"),
    "URL_SHORTENER": _d(0.5, "link through a URL shortener", "url"),
    "URL_USERINFO": _d(2.0, "link with user@ before the host (hides the real host)", "url"),
    "URL_NONSTANDARD_PORT": _d(0.5, "link to a non-standard port", "url"),
    "ATT_DOUBLE_EXT": _d(4.0, "attachment with a double extension (invoice.pdf.exe)",
                         "attachment"),
    "ATT_EXECUTABLE": _d(3.0, "executable or script attachment", "attachment"),
    "ATT_ARCHIVE_EXEC_NAME": _d(1.0, "archive attachment named like a document", "attachment"),
    "BODY_ALL_BASE64_TEXT": _d(1.0, "text/plain sent in base64 without need", "encoding"),
    "CHARSET_MISMATCH": _d(1.0, "declared charset does not decode the text", "encoding"),
    "MISSING_MIME_VERSION": _d(1.0, "MIME parts without MIME-Version", "encoding"),
    "MIME_BAD_BOUNDARY": _d(1.5, "multipart without its closing boundary", "encoding"),
    "EMPTY_BODY": _d(1.0, "no text in the body", "content"),
    "GTUBE": _d(1000.0, "the Generic Test for Unsolicited Bulk Email", "content"),
    # -- sender authentication, from facts["check"] --
    "SPF_FAIL": _d(2.0, "SPF fail (RFC 7208 §2.6.4)", "auth"),
    "SPF_SOFTFAIL": _d(0.5, "SPF softfail", "auth"),
    "SPF_PASS": _d(-0.1, "SPF pass", "auth"),
    "DKIM_REJECT": _d(1.0, "a DKIM signature failed verification", "auth"),
    "DKIM_ALLOW": _d(-0.2, "a DKIM signature verified", "auth"),
    "DMARC_POLICY_REJECT": _d(4.0, "DMARC fail with disposition reject", "auth"),
    "DMARC_POLICY_QUARANTINE": _d(2.5, "DMARC fail with disposition quarantine", "auth"),
    "DMARC_POLICY_SOFTFAIL": _d(0.5, "DMARC fail with disposition none", "auth"),
    "DMARC_POLICY_ALLOW": _d(-0.5, "DMARC pass", "auth"),
    "ARC_ALLOW": _d(-0.5, "ARC chain valid", "auth"),
    "ARC_REJECT": _d(1.0, "ARC chain invalid", "auth"),
    # -- statistics (bayes.py): maximum weights, scaled by the probability --
    "BAYES_SPAM": _d(12.0, "the classifier says spam", "bayes"),
    "BAYES_HAM": _d(-3.0, "the classifier says ham", "bayes"),
    # -- DNS blocklists (dnsbl.py): per zone weights come from the configuration --
    # -- external scanners (external.py): their score times spam.external.weight --
    "RSPAMD": _d(1.0, "rspamd's score (scaled)", "external"),
    "SPAMASSASSIN": _d(1.0, "SpamAssassin's score (scaled)", "external"),
}


@dataclass(frozen=True, slots=True)
class Thresholds:
    quarantine: float = 6.0
    reject: float = 15.0

    def action(self, score: float) -> SpamAction:
        if score >= self.reject:
            return "reject"
        if score >= self.quarantine:
            return "quarantine"
        return "no action"


@dataclass(slots=True)
class Scan:
    """The symbols that fired on one message, and what the score means."""

    weights: Mapping[str, float] = field(default_factory=dict)  # overrides of SYMBOLS
    symbols: dict[str, float] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)

    def weight(self, name: str, default: float = 0.0) -> float:
        if name in self.weights:
            return float(self.weights[name])
        known = SYMBOLS.get(name)
        return known.weight if known is not None else default

    def add(self, name: str, detail: str = "", *, scale: float = 1.0,
            weight: float | None = None) -> None:
        """The symbol fired: its configured weight (times ``scale``) is added.

        ``weight`` is the default for a symbol not in :data:`SYMBOLS` (DNSBL zones);
        a configured override still wins.  A symbol that fires twice keeps the
        larger weight: a rule counts once.
        """
        w = self.weight(name, weight if weight is not None else 0.0) * scale
        w = round(w, 3)
        if name in self.symbols and abs(self.symbols[name]) >= abs(w):
            return
        self.symbols[name] = w
        if detail:
            self.details[name] = detail[:200]

    @property
    def score(self) -> float:
        return round(sum(self.symbols.values()), 3)

    def merge(self, other: Scan) -> None:
        for name, w in other.symbols.items():
            if name not in self.symbols or abs(w) > abs(self.symbols[name]):
                self.symbols[name] = w
        self.details.update(other.details)
