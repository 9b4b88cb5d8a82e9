"""Fail closed: under ``require`` no plaintext ever reaches the next hop.

Each case runs the real queue worker with the transform stage and a Maildir next
hop, then looks at every byte the next hop received.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptokit import Identities, crypto_config, gpg, message

from gateway.config import Config, DeliveryConfig
from gateway.deliver.deliverer import Deliverer
from gateway.envelope import Envelope
from gateway.pipeline import Action, MessageContext, StageResult
from gateway.queue.spool import Spool
from gateway.queue.worker import QueueWorker
from gateway.transform import mime
from gateway.transform.encrypt_stage import EncryptStage

SECRET = b"The secret figure is 42."
SENDER = "signer@corp.test"


class Rig:
    def __init__(self, data_dir: Path, **crypto: Any) -> None:
        self.data_dir = data_dir
        self.cfg = Config(hostname="coffer.test", data_dir=data_dir,
                          delivery=DeliveryConfig(routes={"*": "maildir:mail"}))
        self.stage = EncryptStage.open(data_dir, crypto_config(data_dir, **crypto))
        self.store = self.stage.store
        self.spool = Spool(data_dir / "spool")
        self.worker = QueueWorker(self.cfg, self.spool, [self.stage], Deliverer(self.cfg))

    async def send(self, rcpts: list[str], actions: list[dict[str, Any]]) -> str:
        env = Envelope(mail_from=SENDER, rcpt_to=rcpts)
        data = message(to=", ".join(rcpts))
        qid = self.spool.store(env, data, {"decide": {"actions": actions,
                                                      "direction": "outbound"}})
        await self.worker.run_due()
        return qid

    def received(self, rcpt: str) -> list[bytes]:
        d = self.data_dir / "mail" / rcpt.lower() / "new"
        return [p.read_bytes() for p in sorted(d.iterdir())] if d.exists() else []

    def everything_delivered(self) -> bytes:
        root = self.data_dir / "mail"
        return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file()) \
            if root.exists() else b""

    def statuses(self, qid: str) -> dict[str, str]:
        return {r: s.status.value for r, s in self.spool.load(qid).state.recipients.items()}

    def dsn_text(self) -> str:
        """The DSN to the sender, delivered by a second worker pass."""
        return "".join(m.decode("utf-8", "replace") for m in self.received(SENDER))


@pytest.fixture
async def rig(data_dir: Path) -> AsyncIterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(**crypto: Any) -> Rig:
        r = Rig(data_dir, **crypto)
        rigs.append(r)
        return r

    yield make
    for r in rigs:
        await r.worker.stop(0)
        r.stage.close()


def require(method: str = "auto") -> list[dict[str, Any]]:
    return [{"action": "encrypt", "method": method, "require": True, "rule": "confidential"}]


@pytest.mark.parametrize("rcpt,why", [
    ("nokey@partner.test", "no pgp key"),
    ("expired@partner.test", "expired"),
    ("revoked@partner.test", "revoked"),
    ("old@smime.test", "expired"),
    ("frank@smime.test", "revoked"),
])
async def test_recipient_without_usable_key_bounces_and_nothing_is_sent_in_clear(
        rig: Callable[..., Rig], rcpt: str, why: str) -> None:
    r = rig()
    qid = await r.send([rcpt], require())
    assert r.received(rcpt) == []
    assert SECRET not in r.everything_delivered()
    await r.worker.run_due()  # delivers the DSN to the sender
    dsn = r.dsn_text()
    assert rcpt in dsn and "5.7.1" in dsn and why in dsn
    assert SECRET.decode() not in dsn
    assert not r.spool.queue_ids() or qid not in r.spool.queue_ids()


def final_recipients(dsn: str) -> list[str]:
    """The recipients a DSN reports as failed (RFC 3464 §2.3.2 Final-Recipient)."""
    return re.findall(r"^Final-Recipient: rfc822; (\S+)\r?$", dsn, re.MULTILINE)


async def test_mixed_recipients_under_require_encrypt_for_the_keyed_and_bounce_the_keyless(
        rig: Callable[..., Rig], identities: Identities) -> None:
    r = rig()
    original = message(to="bob@partner.test, nokey@partner.test")
    qid = await r.send(["bob@partner.test", "nokey@partner.test"], require("pgp"))
    assert r.received("nokey@partner.test") == []
    (got,) = r.received("bob@partner.test")
    assert SECRET not in got
    out = gpg(identities.pgp["bob@partner.test"].home, "--decrypt",
              input=mime.pgp_ciphertext(got)).stdout
    assert out == mime.protect(original).entity
    assert qid not in r.spool.queue_ids()
    await r.worker.run_due()  # delivers the DSN to the sender
    (dsn,) = r.received(SENDER)
    text = dsn.decode("utf-8", "replace")
    assert final_recipients(text) == ["nokey@partner.test"]
    assert "Status: 5.7.1" in text and "nokey@partner.test (no pgp key)" in text
    assert SECRET not in dsn
    assert SECRET not in r.everything_delivered()


async def test_mixed_recipients_name_each_reason_expired_revoked_or_missing(
        rig: Callable[..., Rig]) -> None:
    r = rig()
    rcpts = ["carol@partner.test", "expired@partner.test", "revoked@partner.test",
             "nokey@partner.test"]
    await r.send(rcpts, require("pgp"))
    assert len(r.received("carol@partner.test")) == 1
    await r.worker.run_due()
    (dsn,) = r.received(SENDER)
    text = dsn.decode("utf-8", "replace")
    assert sorted(final_recipients(text)) == sorted(rcpts[1:])
    diag = {m[0]: m[1] for m in re.findall(
        r"^Final-Recipient: rfc822; (\S+)\r?\n(?:.*\r?\n)*?Diagnostic-Code: smtp; (.*?)\r?$",
        text, re.MULTILINE)}
    assert "expired" in diag["expired@partner.test"]
    assert "revoked" in diag["revoked@partner.test"]
    assert "no pgp key" in diag["nokey@partner.test"]
    assert all(d.startswith("550 5.7.1") for d in diag.values())
    assert SECRET not in r.everything_delivered()


@dataclass
class TempfailOnce:
    """A later after-queue stage (the archive, say) that fails its first run: the
    transform is done and the refusals are recorded, the delivery has not happened."""

    name: str = "archive"
    once: bool = True
    runs: int = 0

    async def run(self, ctx: MessageContext) -> StageResult:
        self.runs += 1
        if self.runs == 1:
            return StageResult(Action.TEMPFAIL, reason="archive unavailable")
        return StageResult()


async def test_restart_after_refusal_delivers_once_and_never_to_the_refused(
        rig: Callable[..., Rig]) -> None:
    r = rig()
    later = TempfailOnce()
    r.worker = QueueWorker(r.cfg, r.spool, [r.stage, later], Deliverer(r.cfg))
    qid = await r.send(["bob@partner.test", "nokey@partner.test"], require("pgp"))
    assert r.statuses(qid) == {"bob@partner.test": "deferred",
                               "nokey@partner.test": "bounced"}
    assert r.everything_delivered() == b""
    assert "transform" in r.spool.load(qid).state.stages_done

    # A restart: a new spool handle and worker over the same directory, retried now.
    await r.worker.stop(0)
    r.spool = Spool(r.spool.root)
    r.worker = QueueWorker(r.cfg, r.spool, [r.stage, later], Deliverer(r.cfg))
    r.spool.append_event(qid, {"ev": "retry"})
    await r.worker.run_due()
    await r.worker.run_due()  # the DSN
    assert r.received("nokey@partner.test") == []
    (got,) = r.received("bob@partner.test")
    assert mime.encryption_of(mime.split(got)[0] + b"\r\n") == "pgp"
    (dsn,) = r.received(SENDER)
    assert final_recipients(dsn.decode("utf-8", "replace")) == ["nokey@partner.test"]
    assert SECRET not in r.everything_delivered()
    assert r.spool.queue_ids() == []


async def test_every_recipient_with_a_key_receives_only_ciphertext(
        rig: Callable[..., Rig]) -> None:
    r = rig()
    await r.send(["bob@partner.test", "carol@partner.test"], require())
    for who in ("bob@partner.test", "carol@partner.test"):
        (got,) = r.received(who)
        assert mime.encryption_of(mime.split(got)[0] + b"\r\n") == "pgp"
        assert SECRET not in got


async def test_opportunistic_without_key_is_sent_in_clear_and_recorded(
        rig: Callable[..., Rig]) -> None:
    r = rig()
    env = Envelope(mail_from=SENDER, rcpt_to=["nokey@partner.test"])
    ctx_facts = {"decide": {"actions": [{"action": "encrypt", "method": "auto",
                                         "require": False}], "direction": "outbound"}}
    res = await r.stage.run(MessageContext(envelope=env, data=message(), facts=ctx_facts))
    assert res.data is None and res.facts["encrypted"] is False
    assert "nokey@partner.test" in res.facts["clear_reason"]
    await r.send(["nokey@partner.test"], [{"action": "encrypt", "require": False}])
    (got,) = r.received("nokey@partner.test")
    assert SECRET in got


def _crashing_gpg(tmp: Path) -> Path:
    """A gpg that answers python-gnupg's start-up probe, then dies on encryption."""
    script = tmp / "gpg-crash"
    script.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do case "$a" in --encrypt) kill -SEGV $$;; esac; done\n'
        'exec gpg "$@"\n')
    script.chmod(0o755)
    return script


async def test_gpg_crashing_during_encryption_defers_and_sends_nothing(
        rig: Callable[..., Rig], tmp_path: Path) -> None:
    r = rig(gpg_binary=str(_crashing_gpg(tmp_path)))
    qid = await r.send(["bob@partner.test"], require("pgp"))
    assert r.statuses(qid) == {"bob@partner.test": "deferred"}
    assert r.everything_delivered() == b""
    state = r.spool.load(qid).state
    assert "4.7.5" in state.last_error


async def test_gpg_missing_from_path_defers_and_sends_nothing(
        rig: Callable[..., Rig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    r = rig()
    qid = await r.send(["bob@partner.test"], require("pgp"))
    assert r.statuses(qid) == {"bob@partner.test": "deferred"}
    assert r.everything_delivered() == b""


async def test_gpg_missing_even_for_opportunistic_never_falls_back_to_clear(
        rig: Callable[..., Rig]) -> None:
    # A recipient with a key whose encryption fails must not get plaintext either.
    r = rig(gpg_binary="/nonexistent/gpg")
    qid = await r.send(["bob@partner.test"], [{"action": "encrypt", "require": False}])
    assert r.statuses(qid) == {"bob@partner.test": "deferred"}
    assert r.everything_delivered() == b""



def _bin_without_openssl(tmp: Path) -> Path:
    """A PATH directory holding gpg (the key lookups still run it) but no openssl."""
    bindir = tmp / "bin"
    bindir.mkdir()
    real = shutil.which("gpg")
    assert real is not None
    (bindir / "gpg").symlink_to(real)
    return bindir


async def test_openssl_missing_from_path_defers_smime_and_sends_nothing(
        rig: Callable[..., Rig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(_bin_without_openssl(tmp_path)))
    r = rig()
    qid = await r.send(["dave@smime.test"], require("smime"))
    assert r.statuses(qid) == {"dave@smime.test": "deferred"}
    assert r.everything_delivered() == b""
    assert "4.7.5" in r.spool.load(qid).state.last_error
    # It is openssl that is missing (gpg, still on PATH, did the key lookup).
    env = Envelope(mail_from=SENDER, rcpt_to=["dave@smime.test"])
    res = await r.stage.run(MessageContext(envelope=env, data=message(), facts={
        "decide": {"actions": require("smime"), "direction": "outbound"}}))
    assert res.action is Action.TEMPFAIL and res.data is None
    assert "cannot run openssl: not found" in res.facts["error"]


def _fake_openssl(tmp: Path, body: str) -> Path:
    """An openssl that does ``body`` when asked to encrypt, and is openssl otherwise."""
    real = shutil.which("openssl")
    script = tmp / "openssl-fake"
    script.write_text(
        "#!/bin/sh\n"
        f'case "$2" in -encrypt) {body};; esac\n'
        f'exec {real} "$@"\n')
    script.chmod(0o755)
    return script


@pytest.mark.parametrize("body", [
    "kill -SEGV $$",  # crashes
    # exits 0 having written its input (the plaintext entity) as the "ciphertext"
    'while [ $# -gt 0 ]; do case "$1" in -in) i=$2;; -out) o=$2;; esac; shift; done; '
    'cp "$i" "$o"; exit 0',
])
async def test_openssl_crashing_or_lying_during_encryption_defers_and_sends_nothing(
        rig: Callable[..., Rig], tmp_path: Path, body: str) -> None:
    r = rig(openssl_binary=str(_fake_openssl(tmp_path, body)))
    qid = await r.send(["dave@smime.test"], require("smime"))
    assert r.statuses(qid) == {"dave@smime.test": "deferred"}
    assert r.everything_delivered() == b""
    assert "4.7.5" in r.spool.load(qid).state.last_error


async def test_unreadable_capabilities_file_holds_the_message_and_sends_nothing(
        rig: Callable[..., Rig], identities: Identities) -> None:
    r = rig()
    dave = identities.smime["dave@smime.test"].cert.fingerprint(hashes.SHA256()).hex()
    (r.store.certs_dir / f"{dave}.caps.json").write_text("{not json")
    qid = await r.send(["dave@smime.test"], require("smime"))
    state = r.spool.load(qid).state
    assert state.held and state.held_stage == "transform"
    assert "caps.json: unreadable" in state.held_error
    assert r.everything_delivered() == b""
