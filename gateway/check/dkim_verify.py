"""DKIM verification (RFC 6376; ed25519-sha256 per RFC 8463) through dkimpy.

dkimpy verifies one signature per call, so every DKIM-Signature header field is
verified in turn and gets its own verdict.  dkimpy reduces key-lookup problems to
``False``; our DNS adapter and a recording logger recover what happened, so the
verdicts keep RFC 6376 §6.1's distinction between TEMPFAIL (temperror), PERMFAIL
for an unusable signature or key (permerror) and a signature that does not
verify (fail).

``l=`` (RFC 6376 §8.2) lets anyone append to the body without breaking the
signature: such a signature still passes, and its verdict says how many body
bytes it left unsigned so the policy can treat it as a failure.
"""

from __future__ import annotations

import re
from typing import Any

import dkim
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.util import InvalidTagValueList, parse_tag_value

from gateway.check import headers
from gateway.check.dns import DkimDnsFunc, Resolver
from gateway.check.verdicts import DkimVerdict, Result

MIN_KEY_BITS = 1024  # RFC 8301 §3.2: verifiers MUST NOT accept RSA keys under 1024 bits
# dkimpy raises these, besides its own DKIMException, on some malformed messages
# (e.g. IndexError for a header block starting with a continuation line): the
# message is then unverifiable, not a reason to hold it.
LIBRARY_ERRORS = (dkim.DKIMException, IndexError, KeyError, ValueError, TypeError)
_FIELD_RE = re.compile(rb"^dkim-signature\s*:", re.IGNORECASE)


class _Log:
    """A logger for dkimpy that keeps its error messages (which carry the reason)."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def debug(self, *args: Any, **kw: Any) -> None:
        pass

    info = warning = debug

    def error(self, msg: Any, *args: Any, **kw: Any) -> None:
        self.errors.append(str(msg) % args if args else str(msg))


def signature_count(data: bytes) -> int:
    """How many DKIM-Signature header fields the message has (as dkimpy reads it)."""
    if b"dkim-signature" not in headers.lower_header_block(data):
        # Neither dkimpy's parse nor the fallback below can find a field whose name
        # is not in the header at all (both read only the lines before the first
        # empty line); most mail is unsigned, and dkimpy splits and rejoins the
        # whole message to say so (0.12 ms for a 15 kB message).  The search is
        # kept to the header: case-insensitive, over a whole 15 kB message it
        # cost 0.07 ms itself.
        return 0
    try:
        d = dkim.DKIM(data, logger=_Log())
    except LIBRARY_ERRORS:
        # unparsable: one verdict per field that looks like a signature, each permerror
        head = re.split(rb"\r?\n\r?\n", data, maxsplit=1)[0]
        return sum(1 for line in re.split(rb"\r?\n", head) if _FIELD_RE.match(line))
    return sum(1 for name, _ in d.headers if name.lower() == b"dkim-signature")


def _tags(d: dkim.DKIM, idx: int) -> dict[bytes, bytes]:
    sigs = [v for k, v in d.headers if k.lower() == b"dkim-signature"]
    try:
        tags: dict[bytes, bytes] = parse_tag_value(sigs[idx])
        return tags
    except (InvalidTagValueList, IndexError):
        return {}


def _text(b: bytes | None) -> str:
    return (b or b"").decode("ascii", "replace").strip()


def _unsigned_bytes(d: dkim.DKIM, tags: dict[bytes, bytes]) -> int:
    if b"l" not in tags:
        return 0
    try:
        policy = CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
        body = policy.canonicalize_body(d.body)
        return max(0, len(body) - int(tags[b"l"]))
    except (ValueError, InvalidCanonicalizationPolicyError):
        return 0


def verify_one(
    resolver: Resolver, data: bytes, idx: int, *, min_key_bits: int = MIN_KEY_BITS
) -> DkimVerdict:
    """Verify the ``idx``-th (from the top) DKIM-Signature (blocking)."""
    log = _Log()
    dnsfunc = DkimDnsFunc(resolver)
    try:
        d = dkim.DKIM(data, logger=log, minkey=min_key_bits, timeout=resolver.timeout)
    except LIBRARY_ERRORS as exc:
        return DkimVerdict("permerror", reason=f"message not parsable: {exc!r}")
    tags = _tags(d, idx)
    domain, selector = _text(tags.get(b"d")).lower(), _text(tags.get(b"s"))
    header_b = re.sub(r"\s+", "", _text(tags.get(b"b")))[:8]
    algorithm = _text(tags.get(b"a"))
    result: Result
    if algorithm.lower() == "rsa-sha1":
        # RFC 8301 §3.1: verifiers MUST NOT consider rsa-sha1 signatures valid;
        # RFC 8601 §2.7.1 "policy": signed, but not acceptable to this ADMD
        return DkimVerdict("policy", domain, selector, "rsa-sha1 is not accepted (RFC 8301)",
                           0, header_b, algorithm)
    try:
        ok = d.verify(idx=idx, dnsfunc=dnsfunc)
    except LIBRARY_ERRORS as exc:
        reason = str(exc) if isinstance(exc, dkim.DKIMException) else repr(exc)
        # body hash mismatch and expiry are verification failures; the rest is a
        # signature or key that cannot be processed (RFC 6376 §6.1.1, §6.1.2)
        if reason.startswith("body hash mismatch") or "x= value is past" in reason:
            result = "fail"
        else:
            result = "permerror"
        ok = None
    if ok is True:
        result = "pass"
        unsigned = _unsigned_bytes(d, tags)
        reason = (f"l= leaves {unsigned} body bytes unsigned" if unsigned
                  else "signature verified")
    elif ok is False:
        unsigned = 0
        if dnsfunc.temperror:
            result, reason = "temperror", f"key lookup failed: {dnsfunc.temperror}"
        elif dnsfunc.missing:
            result, reason = "permerror", f"no key for signature at {dnsfunc.missing[-1]}"
        elif log.errors:
            result, reason = "permerror", f"unusable key: {log.errors[-1]}"
        else:
            result, reason = "fail", "signature did not verify"
    else:
        unsigned = 0
    return DkimVerdict(result, domain, selector, reason, unsigned, header_b, algorithm)


def verify_sync(
    resolver: Resolver, data: bytes, *, min_key_bits: int = MIN_KEY_BITS
) -> tuple[DkimVerdict, ...]:
    """One verdict per DKIM-Signature header field, top to bottom (blocking)."""
    return tuple(
        verify_one(resolver, data, i, min_key_bits=min_key_bits)
        for i in range(signature_count(data))
    )


async def verify(
    resolver: Resolver, data: bytes, *, min_key_bits: int = MIN_KEY_BITS
) -> tuple[DkimVerdict, ...]:
    """Verify every signature without blocking the event loop."""
    return await resolver.run(verify_sync, resolver, data, min_key_bits=min_key_bits)
