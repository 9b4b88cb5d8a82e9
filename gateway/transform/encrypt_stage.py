"""The transform stage's encryption gateway: carry out the policy's encrypt/sign actions.

Input: the decide stage's facts, ``ctx.facts["decide"]["actions"]``, a list of
dicts as policies.engine writes them::

    {"action": "encrypt", "method": "pgp" | "smime" | "auto", "require": bool, "rule": ...}
    {"action": "sign", "method": "pgp" | "smime" | "auto", "rule": ...}

and ``ctx.facts["decide"]["direction"]`` (inbound/outbound/internal/relay).

What happens (CipherMail's choices; never lacre's/zeyple's fail-open):

==================================  ====================================================
already encrypted (MIME structure)   not touched; inbound: decrypted for the archive if
                                     we hold the key (``facts["transform"]["decrypted"]``)
every recipient has a usable key     one encrypted message to all their keys (sign first
                                     if the policy also says sign)
some lack a key, ``require: true``   the message is encrypted to the keys of the others
                                     and delivered to them only; the keyless ones are
                                     refused (``StageResult.rejected``, 550 5.7.1 naming
                                     each and why: no key / expired / revoked) and the
                                     worker bounces them in one DSN to the sender
no recipient has a key, ``require``  REJECT 550 5.7.1 naming them: the whole message
                                     bounces; nothing leaves in clear
some lack a key, opportunistic       split before the queue (transform.encrypt_split):
                                     the keyed recipients' copy is encrypted, the others'
                                     copy sent in clear (signed if asked), recorded in
                                     facts (``clear_reason``)
gpg / openssl missing or failing     TEMPFAIL 451 4.7.5: retried, never plaintext
no signing key for a sign action     HOLD: an operator fixes the key store
==================================  ====================================================

The encrypted body only ever goes to the recipients whose keys it was encrypted
to: the refused ones are final (bounced) before the worker saves that body.
Opportunistic mixed recipients need different bytes for different recipients
(ciphertext for some, clear for others), which one spooled message cannot carry:
the before-queue EncryptSplitStage spools one copy per group, so this stage sees
either all keyed or all keyless recipients (a key that changed in between falls
back to clear for everyone in that copy, recorded in ``clear_reason``).

Inbound decryption is for the archive only: the recipient still receives the
ciphertext, the decrypted MIME entity is returned base64-encoded in
``facts["transform"]["decrypted"]`` and ``unwrap`` merges it only with the outer
non-Content header fields, never with other (unencrypted) body parts (EFAIL).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.pipeline import Action, MessageContext, StageResult
from gateway.replies import Reply
from gateway.transform import mime, smime, smime_caps
from gateway.transform.config import CryptoConfig
from gateway.transform.errors import CryptoError, IntegrityError, KeyStoreError, ToolError
from gateway.transform.keystore import KeyStore, Lookup, SmimeIdentity

# RFC 3463 §3.8 X.7.1: delivery not authorized (policy); X.7.5: cryptographic failure.
NO_KEY = Reply(550, "5.7.1", "Encryption required but no usable key for: {rcpts}")
CRYPTO_TEMPFAIL = Reply(451, "4.7.5", "Encryption failed temporarily, will retry")


def crypto_actions(facts: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(encrypt actions, sign actions) from the decide stage's facts."""
    decide = facts.get("decide")
    actions = decide.get("actions") if isinstance(decide, dict) else None
    if not isinstance(actions, list):
        return [], []
    acts = [a for a in actions if isinstance(a, dict)]
    return ([a for a in acts if a.get("action") == "encrypt"],
            [a for a in acts if a.get("action") == "sign"])


def _names(missing: dict[str, str], limit: int = 5) -> str:
    """The keyless recipients for a reply line: RFC 5321 §4.5.3.1.5 caps a reply line
    at 512 octets, so a long list is cut and counted."""
    items = [f"{r} ({why[:80]})" for r, why in list(missing.items())[:limit]]
    more = len(missing) - limit
    return ", ".join(items) + (f" and {more} more" if more > 0 else "")


def method_of(actions: list[dict[str, Any]]) -> str:
    """The strictest method asked for: an explicit pgp/smime beats auto."""
    methods = [str(a.get("method", "auto")) for a in actions]
    return next((m for m in methods if m != "auto"), "auto")


class EncryptStage:
    name = "transform"
    once = True

    def __init__(self, store: KeyStore, cfg: CryptoConfig,
                 *, verify_attime: Callable[[], int | None] | None = None) -> None:
        self.store = store
        self.cfg = cfg
        self._attime = verify_attime or (lambda: None)

    @classmethod
    def open(cls, data_dir: Path, cfg: CryptoConfig) -> EncryptStage:
        """The stage over the key store in ``data_dir``; raises KeyStoreError (refuse to
        start) if private key material is readable by group or others."""
        return cls(KeyStore.open(data_dir, cfg), cfg)

    def close(self) -> None:
        """Stop the gpg pool and the keyring's gpg-agent (at shutdown)."""
        self.store.close()

    async def run(self, ctx: MessageContext) -> StageResult:
        facts: dict[str, Any] = {}
        try:
            return await asyncio.wait_for(self._run(ctx, facts), self.cfg.timeout)
        except (ToolError, TimeoutError) as exc:
            # Never plaintext: retry later (the queue's max_age ends in a bounce).
            why = str(exc) or "timed out"
            facts["error"] = why
            return StageResult(Action.TEMPFAIL, CRYPTO_TEMPFAIL, f"crypto failure: {why}",
                               facts=facts)

    async def _run(self, ctx: MessageContext, facts: dict[str, Any]) -> StageResult:
        enc, sig = crypto_actions(ctx.facts)
        kind = mime.encryption_of(ctx.data)
        if kind is not None:
            facts["already_encrypted"] = kind
            if self.cfg.decrypt_inbound:
                await self._decrypt(ctx.data, kind, facts)
            return StageResult(reason=f"already {kind} encrypted", facts=facts)
        if self.cfg.verify_inbound and (found := mime.signed_entity(ctx.data)):
            facts["signature"] = await self._verify(found[1], found[0])
            facts["signature"]["scope"] = "message" if found[2] else "first part"
        if not enc and not sig:
            return StageResult(facts=facts)

        original = ctx.data
        facts["original_sha256"] = hashlib.sha256(original).hexdigest()
        sign_method = method_of(sig) if sig else None
        if enc:
            require = any(bool(a.get("require")) for a in enc)
            facts["require"] = require
            # Lookups may run gpg (the key listing is cached): keep them off the loop.
            method, keys, missing = await self.store.gpg.call(
                self.plan, ctx.envelope.rcpt_to, method_of(enc))
            if missing:
                facts["missing"] = missing
                names = _names(missing)
                if require and not keys:
                    return StageResult(
                        Action.REJECT, NO_KEY.with_text(NO_KEY.text.format(rcpts=names)),
                        f"encrypt required, no usable key for {len(missing)} recipient(s)",
                        facts=facts)
                if require:
                    # Fail closed per recipient: ciphertext for those with keys, a
                    # bounce naming the reason for each of the others.
                    data = await self._encrypt(ctx, method, keys, sign_method, facts)
                    rejected = {r: NO_KEY.with_text(NO_KEY.text.format(rcpts=_names({r: why})))
                                for r, why in missing.items()}
                    return StageResult(
                        reason=f"encrypted ({method}) for {len(keys)} recipient(s), "
                               f"{len(missing)} refused without a usable key",
                        facts=facts, data=data, rejected=rejected)
                facts["encrypted"] = False
                facts["clear_reason"] = "opportunistic: no usable key for " + names
            else:
                data = await self._encrypt(ctx, method, keys, sign_method, facts)
                return StageResult(reason=f"encrypted ({method})", facts=facts, data=data)
        if sign_method is not None:
            if mime.signature_of(original):
                facts["signed"] = "already signed"
                return StageResult(facts=facts)
            signed = await self._sign(ctx, sign_method, facts)
            if signed is None:
                return StageResult(Action.HOLD, reason=facts["sign_error"], facts=facts)
            return StageResult(reason=f"signed ({facts['signed']})", facts=facts, data=signed)
        return StageResult(reason=facts.get("clear_reason", ""), facts=facts)

    # -- planning ------------------------------------------------------------------
    def plan(self, rcpts: list[str], method: str
              ) -> tuple[str, dict[str, Any], dict[str, str]]:
        """(method, {rcpt: key}, {rcpt without key: why}) for the best method."""
        looks: dict[str, Lookup] = {r: self.store.lookup(r) for r in rcpts}
        order = [method] if method != "auto" else (
            [self.cfg.prefer, "smime" if self.cfg.prefer == "pgp" else "pgp"])
        best: tuple[str, dict[str, Any], dict[str, str]] | None = None
        for m in order:
            keys: dict[str, Any] = {}
            missing: dict[str, str] = {}
            for r, lk in looks.items():
                found = lk.pgp if m == "pgp" else lk.smime
                if found:
                    keys[r] = found[0]
                else:
                    missing[r] = "; ".join(lk.unusable) or f"no {m} key"
            if best is None or len(missing) < len(best[2]):
                best = (m, keys, missing)
            if not missing:
                break
        assert best is not None
        return best

    # -- outbound ------------------------------------------------------------------
    def _split(self, data: bytes) -> mime.Split:
        s = mime.protect(data)
        if self.cfg.protected_headers:
            s = mime.protect_headers(s, self.cfg.placeholder_subject)
        return s

    def _signer_address(self, ctx: MessageContext) -> str:
        return self.cfg.sign_as or ctx.envelope.mail_from

    async def _encrypt(self, ctx: MessageContext, method: str, keys: dict[str, Any],
                       sign_method: str | None, facts: dict[str, Any]) -> bytes:
        s = self._split(ctx.data)
        gpg = self.store.gpg
        if method == "pgp":
            signer = None
            if sign_method in ("pgp", "auto"):
                signer = await gpg.call(self.store.pgp_signer, self._signer_address(ctx))
                if signer is None:
                    raise ToolError(f"no usable OpenPGP signing key for "
                                    f"{self._signer_address(ctx)}")
            fprs = sorted(set(keys.values()))
            armored = await gpg.call(gpg.encrypt, s.entity, fprs, signer)
            facts.update(encrypted="pgp", keys=dict(keys),
                         signed="pgp" if signer else None)
            return mime.pgp_encrypted(s.outer, armored)
        entity = s.entity
        signed = None
        if sign_method in ("smime", "auto"):
            ident = await asyncio.to_thread(self.store.smime_signer, self._signer_address(ctx))
            if ident is None:
                raise ToolError(f"no usable S/MIME signing key for {self._signer_address(ctx)}")
            # RFC 8551 §3.7: sign, then encrypt the whole signed entity.
            entity = mime.protect(await self._smime_signed([], entity, ident)).entity
            signed = "smime"
        certs = list({c.fingerprint(hashes.SHA256()): c for c in keys.values()}.values())
        der, plan = await asyncio.to_thread(self._smime_encrypt, entity, certs)
        transport = {c.fingerprint(hashes.SHA256()).hex(): "rsaes-oaep" if oaep
                     else "rsaes-pkcs1v15" for c, oaep in zip(certs, plan.oaep, strict=True)}
        facts.update(encrypted="smime", signed=signed, cipher=plan.cipher,
                     keys={r: c.fingerprint(hashes.SHA256()).hex() for r, c in keys.items()},
                     key_transport=transport)
        return mime.smime_enveloped(s.outer, der, plan.smime_type)

    def _smime_encrypt(self, entity: bytes, certs: list[x509.Certificate]
                       ) -> tuple[bytes, smime_caps.Plan]:
        # RFC 8551 §2.7.1.1: what the recipients said they read (None: unknown).
        plan = smime_caps.choose([self.store.cert_capabilities(c) for c in certs])
        der = smime.encrypt(entity, certs, plan, openssl=self.cfg.openssl_binary,
                            timeout=self.cfg.timeout)
        return der, plan

    async def _sign(self, ctx: MessageContext, method: str, facts: dict[str, Any]
                    ) -> bytes | None:
        s = mime.protect(ctx.data)
        addr = self._signer_address(ctx)
        order = [method] if method != "auto" else (
            [self.cfg.prefer, "smime" if self.cfg.prefer == "pgp" else "pgp"])
        gpg = self.store.gpg
        for m in order:
            if m == "pgp":
                fpr = await gpg.call(self.store.pgp_signer, addr)
                if fpr:
                    sig, micalg = await gpg.call(gpg.sign_detached, s.entity, fpr)
                    facts["signed"] = "pgp"
                    return mime.pgp_signed(s.outer, s.entity, sig, micalg)
            else:
                ident = await asyncio.to_thread(self.store.smime_signer, addr)
                if ident:
                    facts["signed"] = "smime"
                    facts["smime_signing"] = self.cfg.smime_signing
                    return await self._smime_signed(s.outer, s.entity, ident)
        facts["sign_error"] = f"no usable {method} signing key for {addr}"
        return None

    async def _smime_signed(self, outer: list[bytes], entity: bytes,
                            ident: SmimeIdentity) -> bytes:
        """``entity`` S/MIME-signed in the configured form, under the ``outer`` headers."""
        opaque = self.cfg.smime_signing == "opaque"
        der = await asyncio.to_thread(smime.sign, entity, ident.cert, ident.key,
                                      detached=not opaque)
        if opaque:
            return mime.smime_signed_opaque(outer, der)
        return mime.smime_signed_detached(outer, entity, der)

    # -- inbound -------------------------------------------------------------------
    async def _decrypt(self, data: bytes, kind: str, facts: dict[str, Any]) -> None:
        try:
            if kind == "pgp":
                gpg = self.store.gpg
                dec = await gpg.call(gpg.decrypt, mime.pgp_ciphertext(data))
                entity = mime.crlf(dec.data)
                if dec.signature:
                    facts["signature"] = dec.signature
            else:
                entity = await asyncio.to_thread(self._smime_decrypt, mime.smime_der(data))
        except IntegrityError as exc:
            facts["decrypt_error"] = str(exc)
            facts["integrity"] = False
            return
        except (CryptoError, KeyStoreError) as exc:
            # Not for one of our keys, or unreadable: delivered as is, archived encrypted.
            facts["decrypt_error"] = str(exc)
            return
        facts["decrypted"] = base64.b64encode(entity).decode("ascii")
        facts["decrypted_sha256"] = hashlib.sha256(entity).hexdigest()
        if self.cfg.verify_inbound:
            inner = mime.unwrap(data, entity)
            if signed := mime.signature_of(inner):
                facts["signature"] = await self._verify(inner, signed)

    def _learn(self, sig: dict[str, Any]) -> str:
        """Keep what a correspondent's verified signature announced (RFC 8551 §2.7.1)."""
        when = sig.get("signing_time")
        signing_time = datetime.strptime(when, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC) \
            if isinstance(when, str) else None
        return self.store.learn_capabilities(str(sig["fingerprint"]), list(sig["capabilities"]),
                                             signing_time)

    def _smime_decrypt(self, der: bytes) -> bytes:
        errors: list[str] = []
        for ident in self.store.smime_identities():
            if not isinstance(ident.key, rsa.RSAPrivateKey):
                continue
            try:
                return smime.decrypt(der, ident.cert, ident.key, key_pem=ident.key_path,
                                     passphrase=self.store.passphrase,
                                     openssl=self.cfg.openssl_binary, timeout=self.cfg.timeout)
            except ToolError as exc:
                errors.append(str(exc))
        raise ToolError("no S/MIME key of ours opens it" + (f": {errors[-1]}" if errors else ""))

    async def _verify(self, data: bytes, kind: str) -> dict[str, Any]:
        try:
            if kind == "smime":
                anchors = self.cfg.smime_trust_anchors
                facts = await asyncio.to_thread(
                    smime.verify, data, openssl=self.cfg.openssl_binary, trust_anchors=anchors,
                    attime=self._attime(), timeout=self.cfg.timeout)
                if facts.get("valid") and "capabilities" in facts:
                    facts["capabilities_recorded"] = await asyncio.to_thread(
                        self._learn, facts)
                return facts
            signed, sig = mime.signed_parts(data)
            gpg = self.store.gpg
            return await gpg.call(gpg.verify_detached, signed, sig)
        except CryptoError as exc:
            return {"method": kind, "valid": False, "error": str(exc)}


__all__ = ["CRYPTO_TEMPFAIL", "NO_KEY", "EncryptStage", "crypto_actions"]
