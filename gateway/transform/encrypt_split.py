"""Before the queue: split an opportunistic encryption's recipients by who has a key.

Issue 6: "those with a valid key get an encrypted copy, the rest are handled by the
rule ... opportunistic (sent in clear and recorded)".  One spooled message has one
body, so a message whose policy says ``encrypt`` without ``require``, addressed to
recipients some of whom have a usable key and some not, is spooled as two messages
while the client waits: one for the recipients with keys (the transform stage
encrypts it to all of them) and one for the rest (sent in clear, recorded by the
transform stage as opportunistic).  Both are written and fsynced before the single
250 (gateway.runner), so no crash can deliver one part twice or lose the other.

``require`` needs no split: the transform stage encrypts for the keyed recipients
and bounces the others (StageResult.rejected).  The keys are looked up again
after the queue: a key that appears or expires in between is handled there, in
the safe direction (no key -> clear only under an opportunistic rule).
"""

from __future__ import annotations

from typing import Any

from gateway.pipeline import MessageContext, StageResult
from gateway.transform import mime
from gateway.transform.encrypt_stage import EncryptStage, crypto_actions, method_of


def groups(rcpts: list[str], keyed: set[str]) -> list[list[str]]:
    """[recipients with a key, recipients without], or [] when one side is empty (pure)."""
    with_key = [r for r in rcpts if r in keyed]
    without = [r for r in rcpts if r not in keyed]
    return [with_key, without] if with_key and without else []


def wants_split(facts: dict[str, Any], rcpts: list[str], data: bytes) -> str | None:
    """The method to plan with when the split may apply, else None (pure)."""
    enc, _ = crypto_actions(facts)
    if not enc or len(rcpts) < 2 or any(bool(a.get("require")) for a in enc):
        return None
    if mime.encryption_of(data) is not None:
        return None  # already encrypted: the transform stage leaves it alone
    return method_of(enc)


class EncryptSplitStage:
    """Runs after decide; shares the after-queue transform stage's key store."""

    name = "encrypt_split"
    once = True

    def __init__(self, encrypt: EncryptStage) -> None:
        self.encrypt = encrypt

    async def run(self, ctx: MessageContext) -> StageResult:
        rcpts = list(ctx.envelope.rcpt_to)
        method = wants_split(ctx.facts, rcpts, ctx.data)
        if method is None:
            return StageResult()
        _, keys, missing = await self.encrypt.store.gpg.call(self.encrypt.plan, rcpts, method)
        split = groups(rcpts, set(keys))
        if not split:
            return StageResult()
        return StageResult(
            reason=f"opportunistic encryption: {len(split[0])} recipient(s) with a key, "
                   f"{len(split[1])} without get a separate clear copy",
            facts={"with_key": split[0], "without_key": sorted(missing)},
            split=split)
