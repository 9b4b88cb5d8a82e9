"""Fixtures of the encryption-gateway tests: one session-wide set of identities and a
populated key store that each test gets a fresh copy of.  Every gpg-agent started
is stopped at the end.  The helpers live in cryptokit.py."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptokit import (
    ORG_PASS,
    Identities,
    crypto_config,
    fast_agent,
    kill_agent,
    make_identities,
    populate,
)

from gateway.transform.keystore import KeyStore


@pytest.fixture(scope="session")
def identities() -> Iterator[Identities]:
    root = Path(tempfile.mkdtemp(prefix="cofx", dir="/tmp"))
    ids = Identities(root)
    try:
        make_identities(ids)
        yield ids
    finally:
        for home in ids.homes:
            kill_agent(home)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def store_template(identities: Identities) -> Iterator[Path]:
    data = Path(tempfile.mkdtemp(prefix="st", dir=identities.root))
    pf = data / "passphrase"
    pf.write_text(ORG_PASS + "\n")
    pf.chmod(0o600)
    fast_agent(data / "keys" / "gnupg")
    store = KeyStore.open(data, crypto_config(data))
    try:
        populate(store, identities)
    finally:
        store.close()
    yield data


@pytest.fixture
def data_dir(store_template: Path, identities: Identities) -> Iterator[Path]:
    """A fresh copy of the populated key store (its own gpg-agent, stopped after)."""
    dst = Path(tempfile.mkdtemp(prefix="d", dir=identities.root))
    shutil.copytree(store_template, dst, dirs_exist_ok=True, symlinks=True,
                    ignore=shutil.ignore_patterns("S.*", "*.lock", ".#*"))
    yield dst
    kill_agent(dst / "keys" / "gnupg")
    shutil.rmtree(dst, ignore_errors=True)


@pytest.fixture
def store(data_dir: Path) -> Iterator[KeyStore]:
    s = KeyStore.open(data_dir, crypto_config(data_dir))
    yield s
    s.close()
