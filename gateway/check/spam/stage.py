"""SpamStage: the pipeline's "spam" stage (after "check", before "decide").

It scores the message and returns, as every stage does, a result for the
runner; it never rejects by itself:

* ``facts`` (stored under ``ctx.facts["spam"]``, read by the policy's
  ``spam.score``, ``spam.verdict`` and ``spam.symbol`` conditions)::

      {"score": 7.3, "verdict": "spam", "action": "quarantine",
       "symbols": {"BAYES_SPAM": 6.1, "HTML_ONLY": 0.7, ...},
       "bayes": 0.93,                                  # when the classifier was used
       "external": {"spamd": {...}, "rspamd": {"error": "..."}}}   # when configured

* ``headers``: ``X-Spam-Status`` (SpamAssassin's form), so the recipient's client
  can file it; X-Spam-* fields the message arrived with are removed first
  (``data``): a sender must not be able to vouch for itself.

The only non-continue action is TEMPFAIL, when an external scanner failed and
``spam.external.on_error`` says so.

Parsing, heuristics and the classifier are CPU work (about 1 ms for a typical
message): inline for a typical message, in the stage's own worker thread for a
large one so that it never stalls the event loop (gateway.offload).  DNS
blocklists and external scanners are I/O and run concurrently with each other.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gateway.check.dns import Resolver
from gateway.check.spam import dnsbl, external
from gateway.check.spam.config import SpamConfig
from gateway.check.spam.heuristics import link_domains
from gateway.check.spam.scorer import Scorer, Verdict
from gateway.check.spam.symbols import Scan
from gateway.offload import cpu_bound
from gateway.pipeline import Action, MessageContext, StageResult
from gateway.replies import Reply

HEADER = "X-Spam-Status"
# RFC 3463 §3.8 X.7.0: a security/policy check could not be completed
SCANNER_UNAVAILABLE = Reply(451, "4.7.0", "Content scanner unavailable, try again later")

_OUR_FIELDS = re.compile(
    rb"^X-Spam-(?:Status|Flag|Score|Level|Report|Checker-Version):.*\r?\n(?:[ \t].*\r?\n)*",
    re.IGNORECASE | re.MULTILINE,
)


def strip_spam_fields(data: bytes) -> tuple[bytes, int]:
    """The message without X-Spam-* verdict fields in its header section."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        end = data.find(b"\n\n")
    if end < 0:
        return data, 0
    head = data[: end + 2]
    if b"x-spam-" not in head.lower():  # most messages: no need for the pattern's scan
        return data, 0
    head, n = _OUR_FIELDS.subn(b"", head)
    return (head + data[end + 2:], n) if n else (data, 0)


class SpamStage:
    name = "spam"
    once = False

    def __init__(
        self,
        scorer: Scorer,
        resolver: Resolver | None = None,
        *,
        executor: ThreadPoolExecutor | None = None,
        clock: Callable[[], float] = time.time,
        allow_private_dnsbl: bool = False,
    ) -> None:
        self.scorer = scorer
        self.config: SpamConfig = scorer.config
        self.resolver = resolver
        self._own_executor = executor is None
        self.executor = executor or ThreadPoolExecutor(2, thread_name_prefix="coffer-spam")
        self.clock = clock
        self.allow_private_dnsbl = allow_private_dnsbl

    @classmethod
    def from_config(cls, cfg: Any, resolver: Resolver | None = None) -> SpamStage:
        """From a gateway.config.Config; DNS lists need ``resolver`` (the check stage's)."""
        scorer = Scorer.from_config(cfg)
        if resolver is None and scorer.config.dnsbl.enabled:
            resolver = Resolver.from_config(cfg.dns)
        return cls(scorer, resolver)

    def close(self) -> None:
        if self._own_executor:
            self.executor.shutdown(wait=False, cancel_futures=True)
        self.scorer.close()

    def _local(self, data: bytes, check: Mapping[str, Any] | None,
               now: float) -> tuple[Scan, float | None, list[str]]:
        scan = self.scorer.new_scan()
        pm = self.scorer.parse(data)
        bayes = self.scorer.local(pm, scan, check=check, now=now)
        # the link domains are for the DNS lists only
        return scan, bayes, link_domains(pm) if self.config.dnsbl.enabled else []

    async def scan(self, ctx: MessageContext) -> tuple[Verdict, dict[str, Any], str | None]:
        """(verdict, external scanners' facts, the error that asks for a tempfail)."""
        cfg = self.config
        check = ctx.facts.get("check")
        local = cpu_bound(
            len(ctx.data), self.executor, self._local, ctx.data,
            check if isinstance(check, Mapping) else None, self.clock(),
        )
        jobs: dict[str, Any] = {}
        facts: dict[str, Any] = {}
        too_large = len(ctx.data) > cfg.max_size
        ext = cfg.external
        for name, configured in (("rspamd", ext.rspamd), ("spamd", ext.spamd)):
            if configured is None:
                continue
            if too_large:  # as spamc does: too large to scan is passed on unscanned
                facts[name] = {"skipped": f"larger than spam.max_size ({cfg.max_size})"}
            elif ext.rspamd is not None and name == "rspamd":
                jobs[name] = external.rspamd_scan(ext.rspamd, ctx.data, ctx.envelope, ctx.qid)
            elif ext.spamd is not None and name == "spamd":
                jobs[name] = external.spamd_scan(ext.spamd, ctx.data)
        if jobs:
            outcomes = await asyncio.gather(asyncio.ensure_future(local), *jobs.values(),
                                            return_exceptions=True)
            first = outcomes[0]
            if isinstance(first, BaseException):
                raise first
        else:
            # Nothing to run at the same time: no task (creating one and gathering
            # it cost more than the heuristics themselves).
            outcomes = [first := await local]
        scan, bayes, domains = first
        tempfail: str | None = None
        for (name, _), res in zip(jobs.items(), outcomes[1:], strict=True):
            if isinstance(res, external.ScannerError):
                facts[name] = {"error": res.cause}
                if cfg.external.on_error == "tempfail":
                    tempfail = tempfail or str(res)
                continue
            if isinstance(res, BaseException):
                raise res
            assert isinstance(res, external.ScanReport)
            facts[name] = res.to_facts()
            conf = cfg.external.rspamd if name == "rspamd" else cfg.external.spamd
            weight = conf.weight if conf is not None else 1.0
            scan.add("RSPAMD" if name == "rspamd" else "SPAMASSASSIN",
                     f"score {res.score:g} / {res.required:g}", scale=res.score * weight)
        if cfg.dnsbl.enabled and self.resolver is not None:
            listings, errors = await dnsbl.check(
                self.resolver, cfg.dnsbl, ctx.envelope.client_ip, domains,
                allow_private=self.allow_private_dnsbl,
            )
            for li in listings:
                scan.add(li.zone.symbol, f"{li.subject} listed ({','.join(li.codes)})",
                         weight=li.weight)
            if errors:
                scan.add("DNSBL_TEMPFAIL", "; ".join(errors), weight=0.0)
        return self.scorer.verdict(scan, bayes), facts, tempfail

    async def run(self, ctx: MessageContext) -> StageResult:
        cfg = self.config
        if not cfg.enabled or ctx.envelope.role not in cfg.roles:
            return StageResult(reason=f"not scored: {ctx.envelope.role} mail"
                               if cfg.enabled else "not scored: spam.enabled is false")
        verdict, ext, tempfail = await self.scan(ctx)
        if tempfail is not None:
            return StageResult(action=Action.TEMPFAIL, reply=SCANNER_UNAVAILABLE,
                               reason=f"scanner failed: {tempfail}",
                               facts={**verdict.to_facts(), "external": ext})
        facts = verdict.to_facts()
        if ext:
            facts["external"] = ext
        stripped, removed = strip_spam_fields(ctx.data)
        top = sorted(verdict.symbols.items(), key=lambda kv: -abs(kv[1]))[:5]
        reason = (f"score {verdict.score:g} ({verdict.action}): "
                  + (", ".join(f"{k}={v:g}" for k, v in top) or "no symbols"))
        if removed:
            reason += f"; removed {removed} X-Spam field(s) it arrived with"
        return StageResult(
            headers=[(HEADER, verdict.header(self.scorer.thresholds))],
            facts=facts,
            data=stripped if removed else None,
            reason=reason,
        )
