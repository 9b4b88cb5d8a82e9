"""Archive keys: permissions, rotation, malformed files and OpenPGP escrow with the real gpg."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from archive.audit import sha256_text
from archive.errors import EscrowError, KeyFileError
from archive.facade import Archive
from archive.keys import KeyRing
from archive.metadata import Metadata


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_open_creates_private_keys_0600_and_a_public_signing_key(tmp_path: Path) -> None:
    Archive.open(tmp_path).close()
    keys = tmp_path / "archive" / "keys"
    assert mode(keys) == 0o700
    assert mode(keys / "archive-k1.key") == 0o600
    assert mode(keys / "ledger-signing.key") == 0o600
    assert (keys / "ledger-signing.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert (keys / "current").read_text().strip() == "k1"
    # Opening again creates nothing new.
    Archive.open(tmp_path).close()
    assert sorted(p.name for p in keys.iterdir() if not p.name.startswith(".")) == [
        "archive-k1.key", "current", "ledger-signing.key", "ledger-signing.pub"]


@pytest.mark.parametrize("name,loose", [
    ("archive-k1.key", 0o640), ("archive-k1.key", 0o604), ("ledger-signing.key", 0o644),
])
def test_group_or_world_readable_key_file_refuses_to_start(
    tmp_path: Path, name: str, loose: int
) -> None:
    Archive.open(tmp_path).close()
    path = tmp_path / "archive" / "keys" / name
    path.chmod(loose)
    with pytest.raises(KeyFileError, match=rf"{name}: key file is accessible .* chmod 600"):
        Archive.open(tmp_path)


def test_malformed_key_file_is_named_in_the_error(tmp_path: Path) -> None:
    Archive.open(tmp_path).close()
    path = tmp_path / "archive" / "keys" / "archive-k1.key"
    path.write_text('{"id": "k1", "key": "not base64!"}')
    with pytest.raises(KeyFileError, match=r"archive-k1\.key: malformed archive key file"):
        Archive.open(tmp_path)


def test_current_key_without_its_file_is_refused(tmp_path: Path) -> None:
    Archive.open(tmp_path).close()
    (tmp_path / "archive" / "keys" / "archive-k1.key").unlink()
    with pytest.raises(KeyFileError, match="names key 'k1', which has no key file"):
        Archive.open(tmp_path)


def test_rotation_keeps_old_keys_and_records_the_change(tmp_path: Path) -> None:
    with Archive.open(tmp_path) as a:
        assert a.rotate_key() == "k2"
        assert a.rotate_key() == "k3"
        assert a.keys.ids() == ["k1", "k2", "k3"] and a.keys.current.id == "k3"
        rotations = [(e.fields["old_key"], e.fields["new_key"])
                     for e in a.ledger.entries() if e.kind == "key_rotated"]
    assert rotations == [("k1", "k2"), ("k2", "k3")]


def test_key_repr_never_shows_key_material(tmp_path: Path) -> None:
    ring = KeyRing.open(tmp_path / "keys", create=True)
    key = ring.current
    assert base64.b64encode(key.key).decode() not in repr(key)
    assert key.key.hex() not in repr(key)


@pytest.fixture
def gnupghome() -> Iterator[Path]:
    """A throwaway GNUPGHOME (short path: gpg-agent's socket must fit in sun_path)."""
    if shutil.which("gpg") is None:
        pytest.skip("gpg is not installed (apt-get install gnupg)")
    home = Path(tempfile.mkdtemp(prefix="cg-", dir="/tmp"))
    home.chmod(0o700)
    try:
        yield home
    finally:
        subprocess.run(["gpgconf", "--kill", "all"], env={**os.environ, "GNUPGHOME": str(home)},
                       check=False, capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def _officer_key(home: Path, email: str) -> str:
    import gnupg

    gpg = gnupg.GPG(gnupghome=str(home))
    result = gpg.gen_key(gpg.gen_key_input(
        key_type="EDDSA", key_curve="ed25519", subkey_type="ECDH", subkey_curve="cv25519",
        name_email=email, no_protection=True,
    ))
    assert result.fingerprint, result.stderr
    return str(result.fingerprint)


def test_escrow_export_decrypts_with_the_officers_key_to_every_archive_key(
    tmp_path: Path, gnupghome: Path
) -> None:
    fpr = _officer_key(gnupghome, "officer@example.com")
    with Archive.open(tmp_path) as a:
        a.rotate_key()
        armored = a.keys.escrow_export([fpr], gnupghome)
        expected = {k: base64.b64encode(a.keys.get(k).key).decode() for k in a.keys.ids()}
    assert armored.startswith("-----BEGIN PGP MESSAGE-----")
    for key in expected.values():
        assert key not in armored
    plain = subprocess.run(
        ["gpg", "--batch", "--quiet", "--decrypt"], input=armored.encode(), capture_output=True,
        env={**os.environ, "GNUPGHOME": str(gnupghome)}, check=True,
    ).stdout
    bundle = json.loads(plain)
    assert bundle["current"] == "k2"
    assert {k["id"]: k["key"] for k in bundle["keys"]} == expected


def test_escrow_to_an_unknown_recipient_is_a_clear_error(tmp_path: Path, gnupghome: Path) -> None:
    ring = KeyRing.open(tmp_path / "keys", create=True)
    with pytest.raises(EscrowError, match="gpg could not encrypt to 0123456789ABCDEF"):
        ring.escrow_export(["0123456789ABCDEF0123456789ABCDEF01234567"], gnupghome)


def test_escrow_cli_writes_a_0600_file_and_refuses_to_overwrite(
    tmp_path: Path, gnupghome: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from archive_verify_cli import run_coffer

    fpr = _officer_key(gnupghome, "officer2@example.com")
    Archive.open(tmp_path).close()
    out = tmp_path / "escrow.asc"
    args = ["archive", "keys", "escrow", "--data-dir", str(tmp_path), "--recipient", fpr,
            "--gnupghome", str(gnupghome), "--output", str(out)]
    assert run_coffer(args) == 0
    assert mode(out) == 0o600 and out.read_text().startswith("-----BEGIN PGP MESSAGE-----")
    assert run_coffer(args) == 1
    assert "already exists, not overwriting" in capsys.readouterr().err


def test_keys_cli_lists_rotates_and_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from archive_verify_cli import run_coffer

    Archive.open(tmp_path).close()
    where = ["--data-dir", str(tmp_path)]
    assert run_coffer(["archive", "keys", "rotate", *where]) == 0
    assert "archive key k2" in capsys.readouterr().out
    assert run_coffer(["archive", "keys", "list", "--json", *where]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["keys"] == ["k1", "k2"] and listing["current"] == "k2"
    assert len(listing["signing_key_id"]) == 16
    assert run_coffer(["archive", "checkpoint", *where]) == 0
    # 1 key_rotated, then the rotation's audit document and audit entry (archive.audit)
    assert capsys.readouterr().out.startswith("checkpoint 4: head 3 ")
    assert run_coffer(["archive", "verify", *where]) == 0


def test_cli_on_a_directory_without_an_archive_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from archive_verify_cli import run_coffer

    assert run_coffer(["archive", "verify", "--data-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"coffer: {tmp_path / 'archive'}: no archive here\n"
    assert run_coffer(["archive", "keys", "rotate", "--data-dir", str(tmp_path)]) == 1


def test_lost_signing_key_is_not_silently_replaced(tmp_path: Path) -> None:
    Archive.open(tmp_path).close()
    keys = tmp_path / "archive" / "keys"
    pub = (keys / "ledger-signing.pub").read_bytes()
    (keys / "ledger-signing.key").unlink()
    with pytest.raises(KeyFileError, match="ledger signing key missing; restore it"):
        Archive.open(tmp_path)
    assert (keys / "ledger-signing.pub").read_bytes() == pub


def test_missing_public_key_is_rewritten_from_the_private_key(tmp_path: Path) -> None:
    Archive.open(tmp_path).close()
    pub = tmp_path / "archive" / "keys" / "ledger-signing.pub"
    before = pub.read_bytes()
    pub.unlink()
    Archive.open(tmp_path).close()
    assert pub.read_bytes() == before and mode(pub) == 0o644


def test_rotation_by_another_process_is_picked_up_by_a_running_archive(tmp_path: Path) -> None:
    from packs import key_table, record_of

    with Archive.open(tmp_path) as running, Archive.open(tmp_path) as admin:
        admin.rotate_key()
        # Writing: the next batch is wrapped with the key the other process made current.
        ref = running.put(b"stored after the rotation")
        loc = record_of(tmp_path, ref.sha256)
        assert key_table(tmp_path, loc.segment).keys[loc.dkid].kid == "k2"
    with Archive.open(tmp_path) as running, Archive.open(tmp_path) as admin:
        admin.rotate_key()
        written = admin.put(b"wrapped with k3 by the other process")
        # Reading: a blob wrapped with a key not loaded yet makes the key ring reload.
        assert running.get(written.sha256) == b"wrapped with k3 by the other process"


def test_escrow_restore_brings_back_lost_archive_keys(
    tmp_path: Path, gnupghome: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from archive_verify_cli import run_coffer

    fpr = _officer_key(gnupghome, "officer3@example.com")
    with Archive.open(tmp_path) as a:
        old = a.put(b"wrapped with k1")
        a.rotate_key()
        new = a.put(b"wrapped with k2")
        escrow = tmp_path / "escrow.asc"
        escrow.write_text(a.keys.escrow_export([fpr], gnupghome))
    keys = tmp_path / "archive" / "keys"
    for name in ("archive-k1.key", "archive-k2.key", "current"):
        (keys / name).unlink()  # lost; the signing key comes back from a normal backup
    where = ["--data-dir", str(tmp_path), "--gnupghome", str(gnupghome)]
    assert run_coffer(["archive", "keys", "restore", str(escrow), *where]) == 0
    assert capsys.readouterr().out == "restored archive keys: k1, k2\n"
    assert mode(keys / "archive-k1.key") == 0o600
    with Archive.open(tmp_path, create=False) as a:
        assert a.keys.current.id == "k2"
        assert a.get(old.sha256) == b"wrapped with k1"
        assert a.get(new.sha256) == b"wrapped with k2"
    # Restoring again writes nothing; a different key under the same id is refused.
    assert run_coffer(["archive", "keys", "restore", str(escrow), *where]) == 0
    assert "(none: all were present)" in capsys.readouterr().out
    doc = json.loads((keys / "archive-k1.key").read_text())
    doc["key"] = base64.b64encode(b"\0" * 32).decode()
    (keys / "archive-k1.key").write_text(json.dumps(doc))
    assert run_coffer(["archive", "keys", "restore", str(escrow), *where]) == 1
    assert "exists with a different key; not overwriting" in capsys.readouterr().err


def _audits(data_dir: Path) -> tuple[list[Any], list[dict[str, Any]]]:
    """The audit rows of the metadata database and the ``audit`` ledger entries."""
    meta = Metadata.for_data_dir(data_dir)
    try:
        rows = list(meta.audit_events())
    finally:
        meta.close()
    with Archive.open(data_dir, create=False) as a:
        return rows, [e.fields for e in a.ledger.entries() if e.kind == "audit"]


def test_escrow_is_audited_with_the_recipients_and_a_refused_one_too(
    tmp_path: Path, gnupghome: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from archive_verify_cli import run_coffer

    fpr = _officer_key(gnupghome, "officer4@example.com")
    Archive.open(tmp_path).close()
    out = tmp_path / "escrow.asc"
    args = ["archive", "keys", "escrow", "--data-dir", str(tmp_path), "--recipient", fpr,
            "--gnupghome", str(gnupghome), "--output", str(out), "--officer", "dora"]
    assert run_coffer(args) == 0
    assert run_coffer(args) == 1  # the file exists: refused, and audited as refused
    capsys.readouterr()
    rows, entries = _audits(tmp_path)
    assert [(r.who, r.action, r.result_count) for r in rows] == [
        ("dora", "key-escrow", 1), ("dora", "key-escrow", 0)]
    assert rows[0].detail == {"recipients": [fpr], "keys": ["k1"], "output": str(out)}
    assert rows[1].detail["error"] == f"{out}: already exists, not overwriting"
    assert [e["event"] for e in entries] == [r.id for r in rows]
    assert entries[0]["who_sha256"] == sha256_text("dora")
    assert entries[0]["action"] == "key-escrow" and entries[0]["result_count"] == 1


def test_restore_is_audited_once_the_keys_are_back(
    tmp_path: Path, gnupghome: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from archive_verify_cli import run_coffer

    fpr = _officer_key(gnupghome, "officer5@example.com")
    with Archive.open(tmp_path) as a:
        escrow = tmp_path / "escrow.asc"
        escrow.write_text(a.keys.escrow_export([fpr], gnupghome))
    keys = tmp_path / "archive" / "keys"
    for name in ("archive-k1.key", "current"):
        (keys / name).unlink()
    where = ["--data-dir", str(tmp_path), "--gnupghome", str(gnupghome), "--officer", "erin"]
    assert run_coffer(["archive", "keys", "restore", str(escrow), *where]) == 0
    capsys.readouterr()
    rows, entries = _audits(tmp_path)
    ((row,), (entry,)) = rows, entries
    assert (row.who, row.action, row.result_count) == ("erin", "key-restore", 1)
    assert row.detail == {"file": str(escrow), "restored": ["k1"]}
    assert entry["event"] == row.id and entry["who_sha256"] == sha256_text("erin")
