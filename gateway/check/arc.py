"""ARC (RFC 8617): verify the chain a message arrives with, and seal outbound.

Verification gives the chain validation status cv= of RFC 8617 §5.2: ``none``
(no ARC sets), ``pass`` (every set verifies, the last AMS too) or ``fail``.  A
failure caused by a DNS timeout is still ``fail`` (RFC 8617 has no temperror),
with the DNS error in the reason so an operator can tell.

Sealing (RFC 8617 §5.1) adds the next ARC set, carrying Coffer's own
Authentication-Results, so a downstream receiver can trust our verdicts after a
transformation breaks the original DKIM signatures.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path

import dkim

from gateway.check import headers
from gateway.check.config import ArcSealingConfig
from gateway.check.dkim_verify import LIBRARY_ERRORS, MIN_KEY_BITS, _Log
from gateway.check.dns import DkimDnsFunc, Resolver
from gateway.check.verdicts import ArcVerdict, Result
from gateway.errors import CofferError
from gateway.pipeline import MessageContext, StageResult


class ArcSealError(CofferError):
    """The message could not be sealed (bad key, no A-R of ours, chain limit)."""


NOT_ARC_SIGNED = "Message is not ARC signed"  # dkimpy's words for "no ARC set"
_ARC_FIELD_ANYWHERE = re.compile(rb"arc-(?:seal|message-signature|authentication-results)",
                                 re.IGNORECASE)
# Header lines that dkimpy's parser (dkim.rfc822_parse) always accepts: each field
# line a name of printable characters and a colon, each continuation line after one.
_PLAIN_HEADER = re.compile(rb"(?:[\x21-\x39\x3b-\x7e]+:[^\n]*\n(?:[ \t][^\n]*\n)*)*")


def _no_arc_field(data: bytes) -> bool:
    """True if dkimpy could find no ARC header field: verify would say NOT_ARC_SIGNED.

    Only the header is searched when dkimpy can parse it (it reads nothing else
    for ARC fields); a case-insensitive search of a whole 15 kB message cost
    0.08 ms.  An unparsable header makes dkimpy raise, which verify_sync reports
    differently, so then the old test (the name nowhere in the message) decides.
    """
    head = headers.header_block(data)
    low = headers.lower_header_block(data)
    # _ARC_FIELD_ANYWHERE.search(head), on the lowered header with ``in``
    if b"arc-seal" in low or b"arc-message-signature" in low \
            or b"arc-authentication-results" in low:
        return False
    if _PLAIN_HEADER.fullmatch(head) is not None:
        return True  # dkimpy parses such a header (13 µs to ask it, 1 µs this way)
    try:
        dkim.rfc822_parse(head)  # the header lines are all dkimpy parses before a set
    except LIBRARY_ERRORS:
        return _ARC_FIELD_ANYWHERE.search(data) is None
    return True


def verify_sync(resolver: Resolver, data: bytes, *, min_key_bits: int = MIN_KEY_BITS
                ) -> ArcVerdict:
    """The chain's cv= (blocking)."""
    if _no_arc_field(data):
        # No ARC header field can exist (dkimpy would find no set): skip parsing the
        # whole message.  Same verdict and reason as dkimpy's for a parsable message.
        return ArcVerdict("none", NOT_ARC_SIGNED)
    log = _Log()
    dnsfunc = DkimDnsFunc(resolver)
    try:
        arc = dkim.ARC(data, logger=log, minkey=min_key_bits, timeout=resolver.timeout)
        cv, _results, comment = arc.verify(dnsfunc=dnsfunc)
    except LIBRARY_ERRORS as exc:  # an unparsable message or chain
        if not re.search(rb"(?im)^arc-seal\s*:", re.split(rb"\r?\n\r?\n", data, maxsplit=1)[0]):
            return ArcVerdict("none", "no ARC set (message not parsable by dkimpy)")
        return ArcVerdict("fail", f"chain not parsable: {exc!r}")
    result: Result = {b"pass": "pass", b"none": "none"}.get(cv, "fail")  # type: ignore[assignment]
    reason = str(comment or "")
    if result == "fail" and dnsfunc.temperror:
        reason = f"{reason}; DNS: {dnsfunc.temperror}".lstrip("; ")
    return ArcVerdict(result, reason)


async def verify(resolver: Resolver, data: bytes, *, min_key_bits: int = MIN_KEY_BITS
                 ) -> ArcVerdict:
    return await resolver.run(verify_sync, resolver, data, min_key_bits=min_key_bits)


def seal(data: bytes, domain: str, selector: str, key: bytes, authserv_id: str,
         *, timestamp: int | None = None, include_headers: list[str] | None = None,
         standardize: bool = False) -> bytes:
    """The message with the next ARC set prepended (RFC 8617 §5.1).

    The message must already carry our Authentication-Results (authserv-id
    ``authserv_id``); its ``arc=`` result becomes the new set's cv=, and its other
    results the ARC-Authentication-Results.  ``key`` is a PEM RSA private key
    (RFC 8617 §4.1.3 uses the DKIM algorithms; dkimpy seals with rsa-sha256 only).
    ``standardize`` writes the tags sorted and unfolded, as the arc_test_suite's
    reference signatures are.
    """
    from gateway.transform.dkim_sign import DkimSignError, dkimpy_key

    try:
        algorithm, pk = dkimpy_key(key)
    except DkimSignError as exc:
        raise ArcSealError(f"ARC key for {domain}: {exc}") from None
    if algorithm != b"rsa-sha256":
        raise ArcSealError(f"ARC key for {domain}: sealing needs an RSA key")
    try:
        lines = dkim.arc_sign(
            data, selector.encode(), domain.encode(), pk, authserv_id.encode(),
            signature_algorithm=algorithm, timestamp=timestamp,
            include_headers=[h.encode() for h in include_headers] if include_headers else None,
            logger=_Log(), standardize=standardize, linesep=b"\r\n" if b"\r\n" in data else b"\n",
        )
    except (dkim.DKIMException, ImportError) as exc:
        raise ArcSealError(f"cannot ARC-seal for {domain}: {exc}") from None
    if not lines:
        raise ArcSealError(f"cannot ARC-seal for {domain}: no Authentication-Results of "
                           f"{authserv_id} to seal, or the chain was already broken")
    return b"".join(lines) + data


class ArcSealStage:
    """Seals every message that carries our Authentication-Results (after-queue,
    after any transformation and DKIM signing, so the seal covers what is sent)."""

    name = "arc_seal"
    once = True

    def __init__(self, domain: str, selector: str, key: bytes, authserv_id: str) -> None:
        from gateway.transform.dkim_sign import dkimpy_key

        if dkimpy_key(key)[0] != b"rsa-sha256":  # refuse to start with an unusable key
            raise ArcSealError(f"ARC key for {domain}: sealing needs an RSA key")
        self.domain, self.selector, self.key = domain, selector, key
        self.authserv_id = authserv_id

    @classmethod
    def from_config(cls, sealing: ArcSealingConfig, authserv_id: str,
                    resolve: Callable[[Path], Path] = Path) -> ArcSealStage:
        path = resolve(sealing.key_file)
        try:
            key = path.read_bytes()
        except OSError as exc:
            raise ArcSealError(f"ARC key: cannot read {path}: {exc}") from None
        return cls(sealing.domain, sealing.selector, key, authserv_id)

    async def run(self, ctx: MessageContext) -> StageResult:
        try:
            sealed = await asyncio.to_thread(seal, ctx.data, self.domain, self.selector,
                                             self.key, self.authserv_id)
        except ArcSealError as exc:
            return StageResult(reason=f"not sealed: {exc}")
        return StageResult(data=sealed, reason=f"ARC-sealed d={self.domain} s={self.selector}")
