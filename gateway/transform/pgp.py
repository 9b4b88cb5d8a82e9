"""OpenPGP through python-gnupg driving the real ``gpg`` (RFC 4880, PGP/MIME RFC 3156).

:class:`Gpg` owns one GnuPG home directory (the key store's keyring) and only
uses python-gnupg's documented calls.  Every call runs ``gpg`` with ``--batch``
and ``--no-tty`` (python-gnupg adds them) and, when a passphrase is needed,
``--pinentry-mode loopback`` with the passphrase on stdin: no pinentry, no
terminal, no agent configuration.  gpg 2.x still starts its own ``gpg-agent``
for secret-key operations; :meth:`Gpg.close` stops it (``gpgconf --kill``).

Cost: python-gnupg starts one gpg process per call (``gnupg.GPG()`` itself runs
``gpg --list-config`` once).  We keep the keyring *warm* by building one
``gnupg.GPG`` per worker thread once and caching key listings until the keyring
changes (or a minute passes, for expiry); calls run in a thread pool of
``workers`` threads, off the event loop.  bench/crypto.py measured (2 shared
cores): a bare gpg process ~3 ms, a 10 kB encryption ~10 ms, so process start
does not dominate; 4 concurrent gpg processes were *slower* than 1 (they
contend on the keyring's lock), hence one worker by default.

EFAIL (CVE-2017-17688): decrypted data is used only if gpg reports
``DECRYPTION_OKAY`` *and* integrity protection (``GOODMDC``, or an MDC/AEAD
method in ``DECRYPTION_INFO``) and exits 0.  gpg writes plaintext to stdout
before it discovers a missing MDC; that output is thrown away.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import gnupg

from gateway.transform.errors import IntegrityError, KeyStoreError, ToolError

T = TypeVar("T")

# RFC 4880 §9.4 hash algorithm ids -> RFC 3156 §5 micalg names.
MICALG = {"1": "pgp-md5", "2": "pgp-sha1", "3": "pgp-ripemd160", "8": "pgp-sha256",
          "9": "pgp-sha384", "10": "pgp-sha512", "11": "pgp-sha224"}

# Key validity letters in gpg's --with-colons output (doc/DETAILS, field 2).
UNUSABLE_VALIDITY = {"e": "expired", "r": "revoked", "i": "invalid", "d": "disabled"}

LIST_CACHE_SECONDS = 60.0  # expiry is time-based: re-list at least this often


@dataclass(frozen=True, slots=True)
class PgpKey:
    fingerprint: str
    uids: tuple[str, ...]
    created: int
    expires: int | None
    validity: str  # gpg's letter
    caps: str  # gpg's capability letters; upper case: usable by the key as a whole
    secret: bool = False

    @property
    def problem(self) -> str | None:
        """Why this key must not be used to encrypt, or None."""
        if self.validity in UNUSABLE_VALIDITY:
            return UNUSABLE_VALIDITY[self.validity]
        if "D" in self.caps:
            return "disabled"
        if "E" not in self.caps:
            return "no usable encryption subkey"
        return None

    @property
    def can_sign(self) -> bool:
        return self.validity not in UNUSABLE_VALIDITY and "S" in self.caps and self.secret


@dataclass(slots=True)
class Decrypted:
    data: bytes
    signature: dict[str, Any] = field(default_factory=dict)
    status: list[str] = field(default_factory=list)


def status_lines(stderr: str) -> list[str]:
    """gpg's --status-fd lines (python-gnupg collects them from stderr)."""
    return [line[9:] for line in stderr.splitlines() if line.startswith("[GNUPG:] ")]


def integrity_protected(status: Sequence[str]) -> bool:
    """True only for an MDC-checked or AEAD message that decrypted cleanly (EFAIL)."""
    keys = [s.split(" ", 1)[0] for s in status]
    if "DECRYPTION_FAILED" in keys or "BADMDC" in keys or "DECRYPTION_OKAY" not in keys:
        return False
    if "GOODMDC" in keys:
        return True
    for s in status:
        # DECRYPTION_INFO <mdc_method> <sym_algo> [<aead_algo>] (doc/DETAILS)
        if s.startswith("DECRYPTION_INFO "):
            parts = s.split()
            if parts[1] != "0" or (len(parts) > 3 and parts[3] != "0"):
                return True
    return False


def _signature_facts(result: Any) -> dict[str, Any]:
    if not getattr(result, "signature_id", None) and not getattr(result, "fingerprint", None) \
            and not getattr(result, "key_id", None):
        return {}
    return {
        "method": "pgp",
        "valid": bool(result.valid),
        "status": str(result.status or ""),
        "fingerprint": result.fingerprint or "",
        "key_id": result.key_id or "",
        "signer": result.username or "",
        "trust": result.trust_text or "",
    }


class Gpg:
    """One keyring; thread-safe; every method is synchronous (run it in :meth:`call`)."""

    def __init__(
        self, home: Path, *, binary: str = "gpg", workers: int = 1,
        passphrase: str | None = None,
    ) -> None:
        self.home = home
        self.binary = binary
        self.passphrase = passphrase
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gpg")
        self._cache: dict[bool, tuple[tuple[int, int], float, list[PgpKey]]] = {}
        self._cache_lock = threading.Lock()
        self._agent_started = False

    # -- plumbing ------------------------------------------------------------------
    def _gpg(self) -> Any:
        g = getattr(self._local, "gpg", None)
        if g is None:
            self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                g = gnupg.GPG(gpgbinary=self.binary, gnupghome=str(self.home))
            except (OSError, ValueError) as exc:
                raise ToolError(f"cannot run gpg ({self.binary}): {exc}") from None
            g.encoding = "utf-8"
            self._local.gpg = g
        return g

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a synchronous method in the gpg pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        # The agent's socket sits in the home when there is no /run/user/<uid>.
        if self._agent_started or (self.home / "S.gpg-agent").exists():
            gpgconf = shutil.which("gpgconf", path=os.path.dirname(self.binary) or None) \
                or shutil.which("gpgconf")
            if gpgconf:
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    subprocess.run([gpgconf, "--homedir", str(self.home), "--kill", "gpg-agent"],
                                   capture_output=True, timeout=10, check=False)

    @staticmethod
    def _fail(what: str, result: Any) -> ToolError:
        status = status_lines(getattr(result, "stderr", "") or "")
        detail = "; ".join(s for s in status if s.split(" ", 1)[0] in (
            "INV_RECP", "INV_SGNR", "KEYEXPIRED", "KEYREVOKED", "FAILURE", "ERROR",
            "NO_SECKEY", "BAD_PASSPHRASE", "MISSING_PASSPHRASE", "DECRYPTION_FAILED"))
        rc = getattr(result, "returncode", None)
        return ToolError(f"gpg {what} failed (exit {rc}, {result.status or 'no status'})"
                         + (f": {detail}" if detail else ""))

    # -- keys ----------------------------------------------------------------------
    def _stamp(self) -> tuple[int, int]:
        stamps = []
        for name in ("pubring.kbx", "trustdb.gpg"):
            try:
                stamps.append((self.home / name).stat().st_mtime_ns)
            except FileNotFoundError:
                stamps.append(0)
        return stamps[0], stamps[1]

    def list_keys(self, secret: bool = False) -> list[PgpKey]:
        stamp, now = self._stamp(), time.monotonic()
        with self._cache_lock:
            hit = self._cache.get(secret)
            if hit and hit[0] == stamp and now - hit[1] < LIST_CACHE_SECONDS:
                return hit[2]
        raw = self._gpg().list_keys(secret=secret)
        if getattr(raw, "returncode", 0) not in (0, None):
            raise self._fail("list-keys", raw)
        keys = [
            PgpKey(
                fingerprint=k["fingerprint"],
                uids=tuple(k.get("uids") or ()),
                created=int(k.get("date") or 0),
                expires=int(k["expires"]) if k.get("expires") else None,
                validity=k.get("trust") or "-",
                caps=k.get("cap") or "",
                secret=secret,
            )
            for k in raw
        ]
        with self._cache_lock:
            self._cache[secret] = (stamp, now, keys)
        return keys

    def invalidate(self) -> None:
        with self._cache_lock:
            self._cache.clear()

    def secret_packets(self, data: bytes) -> list[bool]:
        """For each secret (sub)key packet in ``data``: is it passphrase-protected?"""
        try:
            r = subprocess.run([self.binary, "--batch", "--no-tty", "--homedir", str(self.home),
                                "--list-packets"], input=data, capture_output=True,
                               timeout=60, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            raise ToolError(f"cannot run gpg ({self.binary}): {exc}") from None
        out: list[bool] = []
        for line in r.stdout.decode("utf-8", "replace").splitlines():
            if line.startswith((":secret key packet:", ":secret sub key packet:")):
                out.append(False)
            elif out and ("protected]" in line or "gnu-dummy" in line):
                out[-1] = True  # "skey[n]: [v4 protected]", or a stub (key on a card)
        return out

    def import_keys(self, data: bytes) -> list[str]:
        """Import keys; secret keys only if protected by our passphrase (checked by
        signing with them), so they are stored encrypted and usable unattended."""
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        secret = self.secret_packets(data)
        if secret and not all(secret):
            raise KeyStoreError("the secret key is not passphrase-protected: protect it "
                                "(gpg --passwd) with the passphrase in crypto.passphrase_file "
                                "before importing")
        if secret and not self.passphrase:
            raise KeyStoreError("importing a secret key needs crypto.passphrase_file")
        result = self._gpg().import_keys(data)
        self.invalidate()
        fprs = sorted({r["fingerprint"] for r in result.results if r.get("fingerprint")})
        if not fprs:
            raise self._fail("import", result)
        if secret:
            self._agent_started = True
            ours = {k.fingerprint for k in self.list_keys(secret=True)}
            for fpr in fprs:
                if fpr not in ours:
                    continue
                probe = self._gpg().sign(b"probe", keyid=fpr, detach=True,
                                         passphrase=self.passphrase)
                if probe.returncode != 0 or not probe.data:
                    self.delete(fpr)
                    raise KeyStoreError(
                        f"secret key {fpr} does not open with crypto.passphrase_file's "
                        "passphrase (not imported): re-protect it with that passphrase")
        return fprs

    def delete(self, fingerprint: str) -> None:
        g = self._gpg()
        if any(k.fingerprint == fingerprint for k in self.list_keys(secret=True)):
            r = g.delete_keys(fingerprint, secret=True, passphrase=self.passphrase or "",
                              expect_passphrase=False)
            if str(r) != "ok":
                raise ToolError(f"gpg could not delete secret key {fingerprint}: {r}")
        r = g.delete_keys(fingerprint)
        self.invalidate()
        if str(r) != "ok":
            raise ToolError(f"gpg could not delete key {fingerprint}: {r}")

    # -- operations ----------------------------------------------------------------
    def encrypt(self, data: bytes, recipients: Sequence[str], sign: str | None = None) -> bytes:
        """ASCII-armoured OpenPGP message to every fingerprint; signed first if ``sign``."""
        if sign and not self.passphrase:
            raise ToolError("signing needs crypto.passphrase_file")
        extra = ["--digest-algo", "SHA256"] if sign else []
        # The key store is the trust decision: an imported key is used (--trust-model
        # always); gpg still refuses expired and revoked keys.
        result = self._gpg().encrypt(
            data, list(recipients), sign=sign, always_trust=True, armor=True,
            passphrase=self.passphrase if sign else None, extra_args=extra)
        if sign:
            self._agent_started = True
        if not result.ok or result.returncode != 0 or not result.data:
            raise self._fail("encrypt", result)
        return bytes(result.data)

    def sign_detached(self, data: bytes, signer: str) -> tuple[bytes, str]:
        """(ASCII-armoured detached signature, RFC 3156 micalg)."""
        if not self.passphrase:
            raise ToolError("signing needs crypto.passphrase_file")
        self._agent_started = True
        result = self._gpg().sign(data, keyid=signer, detach=True, binary=False,
                                  passphrase=self.passphrase,
                                  extra_args=["--digest-algo", "SHA256"])
        if result.returncode != 0 or not result.data or not result.hash_algo:
            raise self._fail("sign", result)
        micalg = MICALG.get(str(result.hash_algo))
        if micalg is None:
            raise ToolError(f"gpg used unknown hash algorithm {result.hash_algo}")
        return bytes(result.data), micalg

    def decrypt(self, data: bytes) -> Decrypted:
        """Plaintext of an OpenPGP message to one of our secret keys, integrity-checked."""
        self._agent_started = True
        result = self._gpg().decrypt(data, passphrase=self.passphrase or "",
                                     always_trust=True)
        status = status_lines(result.stderr or "")
        keys = {s.split(" ", 1)[0] for s in status}
        # DECRYPTION_INFO: the session key was recovered (so the key was ours); from
        # here on, anything short of verified integrity is refused.
        if "DECRYPTION_INFO" in keys and not integrity_protected(status):
            # gpg may have printed the plaintext already: drop it.
            raise IntegrityError("OpenPGP message without integrity protection (MDC/AEAD) "
                                 "refused")
        if not result.ok or result.returncode != 0:
            raise self._fail("decrypt", result)
        return Decrypted(bytes(result.data), _signature_facts(result), status)

    def verify_detached(self, data: bytes, signature: bytes) -> dict[str, Any]:
        """Verification facts for a detached signature over ``data`` (RFC 3156 §5)."""
        with tempfile.NamedTemporaryFile(dir=self.home, suffix=".sig") as f:
            f.write(signature)
            f.flush()
            result = self._gpg().verify_data(f.name, data)
        facts = _signature_facts(result) or {"method": "pgp", "valid": False,
                                              "status": str(result.status or "no signature")}
        return facts


__all__ = ["MICALG", "Decrypted", "Gpg", "PgpKey", "integrity_protected", "status_lines"]
