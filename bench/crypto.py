"""Encryption-gateway benchmark (issue 6): prints one JSON line.

    .venv/bin/python bench/crypto.py [--messages N] [--rounds R]

In one run, with keys made on the spot (gpg ed25519/cv25519, RSA-2048 S/MIME):

* ``gpg_process_ms``: one bare ``gpg --version`` process (what python-gnupg pays
  per call before any crypto);
* ``openssl_process_ms``: one bare ``openssl version`` process (S/MIME encryption
  runs one ``openssl cms -encrypt`` per message);
* ``pgp_encrypt_ms`` / ``smime_encrypt_ms`` (AES-256-CBC, a recipient whose
  capabilities are unknown) / ``smime_gcm_encrypt_ms`` (AES-256-GCM, a recipient
  announcing it) at 10 kB and 1 MB, all RSAES-OAEP: the transform stage's whole
  per-message cost (key lookup, MIME split, encryption, wrapping), median of R
  rounds;
* ``pgp_10k_msgs_per_s_workers_1`` / ``_workers_4``: 10 kB PGP encryptions run
  32 at a time through the gpg pool with 1 and 4 threads: whether pooling pays
  (on 2 shared cores it does not: concurrent gpg processes wait on the keyring
  lock);
* ``relay_msgs_per_s_{plain,pgp,smime}``: N spooled 10 kB messages drained by the
  real queue worker (fsync on) to an aiosmtpd sink on 127.0.0.1, without the
  stage and with every message encrypted: the relay cost of encryption.

Figures depend on the machine and its load: compare figures from the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "transform"))

from aiosmtpd.controller import Controller  # noqa: E402
from cryptokit import (  # noqa: E402
    Identities,
    _pgp_identity,
    _smime_identity,
    crypto_config,
    kill_agent,
)

from gateway.config import Config, DeliveryConfig  # noqa: E402
from gateway.deliver.deliverer import Deliverer  # noqa: E402
from gateway.envelope import Envelope  # noqa: E402
from gateway.pipeline import MessageContext, Stage  # noqa: E402
from gateway.queue.spool import Spool  # noqa: E402
from gateway.queue.worker import QueueWorker  # noqa: E402
from gateway.transform.encrypt_stage import EncryptStage  # noqa: E402
from gateway.transform.keystore import KeyStore  # noqa: E402

PGP_RCPT, SMIME_RCPT, GCM_RCPT = "bob@partner.test", "dave@smime.test", "erin@smime.test"


def make_message(size: int) -> bytes:
    head = (b"From: bench@corp.test\r\nTo: someone@partner.test\r\nSubject: figures\r\n"
            b"Message-ID: <b@corp.test>\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=us-ascii\r\n\r\n")
    # Base64 of random bytes: text that does not compress (gpg compresses first).
    rnd = base64.encodebytes(random.Random(size).randbytes(size * 3 // 4)).replace(
        b"\n", b"\r\n")
    return head + rnd[: max(0, size - len(head))].rsplit(b"\r\n", 1)[0] + b"\r\n"


def ctx(data: bytes, rcpt: str, method: str) -> MessageContext:
    return MessageContext(envelope=Envelope(mail_from="bench@corp.test", rcpt_to=[rcpt]),
                          data=data, facts={"decide": {"actions": [
                              {"action": "encrypt", "method": method, "require": True}]}})


def setup(root: Path) -> tuple[Identities, Path]:
    ids = Identities(root)
    _pgp_identity(ids, "Bob", PGP_RCPT)
    ca = _smime_identity(ids, "ca@ca.test", ca=None)
    _smime_identity(ids, SMIME_RCPT, ca=ca)
    _smime_identity(ids, GCM_RCPT, ca=ca)
    data = root / "data"
    data.mkdir()
    (data / "passphrase").write_text("x\n")
    (data / "passphrase").chmod(0o600)
    store = KeyStore.open(data, crypto_config(data))
    store.import_bytes(ids.pgp[PGP_RCPT].public)
    store.import_file(ids.smime[SMIME_RCPT].cert_pem)
    store.import_file(ids.smime[GCM_RCPT].cert_pem, capabilities=["aes256-gcm", "aes256-cbc"])
    store.close()
    return ids, data


async def stage_cost(stage: EncryptStage, rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, size in (("10k", 10 * 1024), ("1m", 1024 * 1024)):
        msg = make_message(size)
        for name, method, rcpt in (("pgp", "pgp", PGP_RCPT), ("smime", "smime", SMIME_RCPT),
                                   ("smime_gcm", "smime", GCM_RCPT)):
            times = []
            for _ in range(rounds):
                t = time.perf_counter()
                res = await stage.run(ctx(msg, rcpt, method))
                times.append(time.perf_counter() - t)
                assert res.data is not None, res.reason
            if method == "smime":
                assert res.facts["cipher"] == ("aes-256-gcm" if rcpt == GCM_RCPT
                                               else "aes-256-cbc"), res.facts
            out[f"{name}_encrypt_ms_{label}"] = round(statistics.median(times) * 1000, 2)
    return out


async def pool_rate(data: Path, workers: int, n: int = 64) -> float:
    store = KeyStore.open(data, crypto_config(data, gpg_workers=workers))
    stage = EncryptStage(store, crypto_config(data, gpg_workers=workers))
    msg = make_message(10 * 1024)
    sem = asyncio.Semaphore(32)

    async def one() -> None:
        async with sem:
            await stage.run(ctx(msg, PGP_RCPT, "pgp"))

    t = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    rate = n / (time.perf_counter() - t)
    store.close()
    return round(rate, 1)


class _Sink:
    def __init__(self) -> None:
        self.count = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.count += 1
        return "250 2.0.0 Ok"


async def relay_rate(data: Path, port: int, method: str | None, n: int) -> float:
    run_dir = Path(tempfile.mkdtemp(dir=data.parent, prefix=f"relay-{method}-"))
    cfg = Config(hostname="bench.test", data_dir=run_dir, delivery=DeliveryConfig(
        routes={"*": f"smtp://127.0.0.1:{port}?tls=off"}))
    stages: list[Stage] = []
    store = None
    if method:
        store = KeyStore.open(data, crypto_config(data))
        stages.append(EncryptStage(store, crypto_config(data)))
    spool = Spool(run_dir / "spool")
    rcpt = SMIME_RCPT if method == "smime" else PGP_RCPT
    msg = make_message(10 * 1024)
    facts = {"decide": {"actions": [{"action": "encrypt", "method": method or "auto",
                                     "require": True}] if method else []}}
    for _ in range(n):
        spool.store(Envelope(mail_from="bench@corp.test", rcpt_to=[rcpt]), msg, facts)
    worker = QueueWorker(cfg, spool, stages, Deliverer(cfg))
    t = time.perf_counter()
    await worker.run_due()
    elapsed = time.perf_counter() - t
    left = len(spool.queue_ids())
    await worker.stop(0)
    if store:
        store.close()
    shutil.rmtree(run_dir, ignore_errors=True)
    if left:
        raise RuntimeError(f"{left} messages not delivered ({method})")
    return round(n / elapsed, 1)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="cofb", dir="/tmp"))
    ids: Identities | None = None
    try:
        ids, data = setup(root)
        result: dict[str, Any] = {"bench": "crypto", "messages": args.messages,
                                  "rounds": args.rounds, "cpus": os.cpu_count(),
                                  "load_1m": round(os.getloadavg()[0], 2)}
        for tool in ("gpg", "openssl"):
            ts = []
            for _ in range(10):
                t = time.perf_counter()
                subprocess.run([tool, "version" if tool == "openssl" else "--version"],
                               capture_output=True, check=True)
                ts.append(time.perf_counter() - t)
            result[f"{tool}_process_ms"] = round(statistics.median(ts) * 1000, 2)
        store = KeyStore.open(data, crypto_config(data))
        result.update(await stage_cost(EncryptStage(store, crypto_config(data)), args.rounds))
        store.close()
        result["pgp_10k_msgs_per_s_workers_1"] = await pool_rate(data, 1)
        result["pgp_10k_msgs_per_s_workers_4"] = await pool_rate(data, 4)
        sink = _Sink()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        controller = Controller(sink, hostname="127.0.0.1", port=port)
        controller.start()
        try:
            for method in (None, "pgp", "smime"):
                result[f"relay_msgs_per_s_{method or 'plain'}"] = await relay_rate(
                    data, port, method, args.messages)
        finally:
            controller.stop()
        result["load_1m_end"] = round(os.getloadavg()[0], 2)
        return result
    finally:
        if ids:
            for home in ids.homes:
                kill_agent(home)
        kill_agent(root / "data" / "keys" / "gnupg")
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=200, help="messages per relay run")
    ap.add_argument("--rounds", type=int, default=9, help="rounds per per-message figure")
    args = ap.parse_args(argv)
    print(json.dumps(asyncio.run(run(args)), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
