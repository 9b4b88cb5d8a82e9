"""The S3 blob store and ledger mirror against a real S3 server (SeaweedFS) on loopback.

What the storage itself enforces is tested from outside Coffer too: an unexpired
(COMPLIANCE-locked) or legally held blob version is refused a DeleteObject sent
straight through boto3 with AccessDenied, exactly as a probe on this machine
measured.  Retention ends a few seconds ahead so expiry is real, not simulated.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from pydantic import ValidationError
from seaweed import Seaweed, seaweed

from archive.errors import ArchiveError, BlobShreddedError, KeyFileError, LedgerError
from archive.facade import Archive, ArchivePaths
from archive.keys import KeyRing
from archive.ledger import Ledger
from archive.s3config import S3Config
from archive.s3store import (
    BucketConfigError,
    ObjectLockedError,
    ObjectStoreError,
    ObjectStoreUnavailableError,
    S3BlobStore,
    S3LedgerMirror,
    make_client,
)
from archive.verify import Verifier

__all__ = ["seaweed"]  # the fixture, imported for pytest

SHORT = 1.0  # seconds of retention for the tests that watch it expire


def _cfg(sw: Seaweed, bucket: str, **kw: Any) -> S3Config:
    base: dict[str, Any] = {
        "endpoint": sw.endpoint, "region": sw.region, "bucket": bucket,
        "addressing_style": "path", "access_key_id": sw.access_key,
        "secret_access_key": sw.secret_key, "create_bucket": True,
        "connect_timeout": 2, "read_timeout": 10, "max_attempts": 1,
    }
    base.update(kw)
    return S3Config.model_validate(base)


@pytest.fixture
def keyring(tmp_path: Path) -> KeyRing:
    return KeyRing.open(tmp_path / "keys", create=True)


@pytest.fixture(params=["dir", "bucket"])
def store(request: pytest.FixtureRequest, seaweed: Seaweed, keyring: KeyRing,
          tmp_path: Path) -> Iterator[S3BlobStore]:
    """An S3 blob store; wrapped keys in a local directory, or in an unlocked bucket."""
    key_bucket = Seaweed.bucket_name("k") if request.param == "bucket" else None
    cfg = _cfg(seaweed, Seaweed.bucket_name("b"), key_bucket=key_bucket)
    s = S3BlobStore.open(cfg, keyring, tmp_path)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def local_keys_store(seaweed: Seaweed, keyring: KeyRing,
                     tmp_path: Path) -> Iterator[S3BlobStore]:
    """For what the storage enforces, where the key store makes no difference."""
    s = S3BlobStore.open(_cfg(seaweed, Seaweed.bucket_name("b")), keyring, tmp_path)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def raw(seaweed: Seaweed) -> Iterator[Any]:
    """A plain boto3 client: the storage as anyone with the credentials sees it."""
    c = seaweed.client()
    try:
        yield c
    finally:
        c.close()


def _msg(tag: str) -> bytes:
    return (f"From: a@example.org\r\nTo: b@example.org\r\nSubject: {tag}\r\n\r\n"
            f"The secret plan is {tag}.\r\n").encode() * 20


def _versions(raw: Any, bucket: str, key: str) -> list[dict[str, Any]]:
    page = raw.list_object_versions(Bucket=bucket, Prefix=key)
    return [v for v in page.get("Versions", []) if v["Key"] == key]


def _wait_until(when: datetime) -> None:
    # The server's clock decides expiry; step past the end with a margin.
    while datetime.now(UTC) < when + timedelta(seconds=1.1):
        time.sleep(0.2)


def test_put_then_read_returns_the_exact_bytes(store: S3BlobStore) -> None:
    data = _msg("round-trip")
    ref = store.put(data)
    assert ref.new and ref.size == len(data)
    assert store.exists(ref.sha256)
    assert store.read(ref.sha256) == data
    assert store.data_key_present(ref.sha256)
    assert list(store.iterate()) == [ref.sha256]


def test_the_same_bytes_are_stored_once(store: S3BlobStore, raw: Any) -> None:
    data = _msg("dedup")
    refs = store.write_many([data, _msg("other"), data])
    assert [r.new for r in refs] == [True, True, False]
    again = store.put(data)
    assert not again.new and again.sha256 == refs[0].sha256
    assert again.stored_size == refs[0].stored_size
    assert len(_versions(raw, store.bucket, store.name(refs[0].sha256))) == 1
    assert sorted(store.iterate()) == sorted({refs[0].sha256, refs[1].sha256})


def test_no_plaintext_in_any_stored_object_or_on_the_servers_disk(
        store: S3BlobStore, raw: Any, seaweed: Seaweed, tmp_path: Path) -> None:
    marker = "zebra-" + os.urandom(6).hex()
    ref = store.put(_msg(marker))
    assert store.read(ref.sha256) == _msg(marker)
    names = [o["Key"] for o in raw.list_objects_v2(Bucket=store.bucket).get("Contents", [])]
    assert names == [store.name(ref.sha256)]
    for name in names:
        body = raw.get_object(Bucket=store.bucket, Key=name)["Body"].read()
        assert marker.encode() not in body
        assert b"secret plan" not in body
    # Nothing the server wrote (volumes, filer metadata) nor our key files holds it.
    for root in (seaweed.workdir / "data", tmp_path):
        for dirpath, _dirs, files in os.walk(root):
            for f in files:
                p = Path(dirpath) / f
                if p.is_file() and not p.name.endswith(".sock"):
                    assert marker.encode() not in p.read_bytes(), p


def test_blobs_are_locked_in_compliance_mode_until_their_retention_end(
        local_keys_store: S3BlobStore) -> None:
    store = local_keys_store
    end = (datetime.now(UTC) + timedelta(days=400)).replace(microsecond=0)
    ref = store.put(_msg("locked"), retain_until=end)
    state = store.lock_state(ref.sha256)
    assert state.mode == "COMPLIANCE"
    assert state.retain_until == end
    assert not state.legal_hold


def test_wrapped_data_keys_live_outside_the_locked_bucket(store: S3BlobStore,
                                                          raw: Any) -> None:
    ref = store.put(_msg("keys-outside"))
    names = [o["Key"] for o in raw.list_objects_v2(Bucket=store.bucket).get("Contents", [])]
    assert names == [f"blobs/{ref.sha256[:2]}/{ref.sha256}"]
    assert store.data_key_present(ref.sha256)


def test_an_unexpired_blob_cannot_be_deleted_even_directly_through_the_s3_api(
        store: S3BlobStore, raw: Any) -> None:
    ref = store.put(_msg("unexpired"), retain_until=datetime.now(UTC) + timedelta(days=1))
    with pytest.raises(ObjectLockedError, match="refuses deletion"):
        store.delete(ref.sha256)
    name = store.name(ref.sha256)
    (version,) = _versions(raw, store.bucket, name)
    with pytest.raises(ClientError) as err:
        raw.delete_object(Bucket=store.bucket, Key=name, VersionId=version["VersionId"])
    assert err.value.response["Error"]["Code"] == "AccessDenied"
    # Nor can the lock be shortened (COMPLIANCE mode).
    with pytest.raises(ClientError) as err:
        raw.put_object_retention(
            Bucket=store.bucket, Key=name, VersionId=version["VersionId"],
            Retention={"Mode": "COMPLIANCE",
                       "RetainUntilDate": datetime.now(UTC) + timedelta(hours=1)})
    assert err.value.response["Error"]["Code"] == "AccessDenied"
    assert store.read(ref.sha256) == _msg("unexpired")


def test_an_expired_blob_is_removed(local_keys_store: S3BlobStore, raw: Any) -> None:
    store = local_keys_store
    end = datetime.now(UTC) + timedelta(seconds=SHORT)
    ref = store.put(_msg("expires"), retain_until=end)
    _wait_until(end)
    assert store.shred(ref.sha256) == 1
    assert store.delete(ref.sha256)
    assert not store.exists(ref.sha256)
    assert _versions(raw, store.bucket, store.name(ref.sha256)) == []


def test_a_legal_hold_blocks_deletion_until_it_is_released(local_keys_store: S3BlobStore,
                                                             raw: Any) -> None:
    store = local_keys_store
    end = datetime.now(UTC) + timedelta(seconds=SHORT)
    ref = store.put(_msg("held"), retain_until=end)
    store.place_hold(ref.sha256)
    assert store.lock_state(ref.sha256).legal_hold
    _wait_until(end)  # retention is over: only the hold protects it now
    name = store.name(ref.sha256)
    (version,) = _versions(raw, store.bucket, name)
    with pytest.raises(ClientError) as err:
        raw.delete_object(Bucket=store.bucket, Key=name, VersionId=version["VersionId"])
    assert err.value.response["Error"]["Code"] == "AccessDenied"
    with pytest.raises(ObjectLockedError):
        store.delete(ref.sha256)
    store.release_hold(ref.sha256)
    assert not store.lock_state(ref.sha256).legal_hold
    assert store.delete(ref.sha256)
    assert not store.exists(ref.sha256)


def test_crypto_shredding_an_unexpired_blob_makes_it_unreadable_though_the_object_stays(
        store: S3BlobStore, raw: Any) -> None:
    data = _msg("shred-me")
    ref = store.put(data, retain_until=datetime.now(UTC) + timedelta(days=1))
    assert store.shred(ref.sha256) == 1
    assert not store.data_key_present(ref.sha256)
    with pytest.raises(BlobShreddedError, match="data key was destroyed"):
        store.read(ref.sha256)
    # The locked ciphertext is still there, and still cannot be deleted ...
    assert store.exists(ref.sha256)
    assert len(store.read_sealed(ref.sha256)) == ref.stored_size
    with pytest.raises(ObjectLockedError):
        store.delete(ref.sha256)
    # ... nor can the same bytes be stored again under a fresh key.
    with pytest.raises(BlobShreddedError):
        store.put(data)


def test_a_later_retention_end_for_the_same_bytes_extends_the_lock(
        local_keys_store: S3BlobStore) -> None:
    store = local_keys_store
    now = datetime.now(UTC).replace(microsecond=0)
    ref = store.put(_msg("extend"), retain_until=now + timedelta(days=10))
    store.put(_msg("extend"), retain_until=now + timedelta(days=30))
    assert store.lock_state(ref.sha256).retain_until == now + timedelta(days=30)
    store.put(_msg("extend"), retain_until=now + timedelta(days=5))  # never shortened
    assert store.lock_state(ref.sha256).retain_until == now + timedelta(days=30)


def test_an_existing_blob_is_never_overwritten(local_keys_store: S3BlobStore,
                                               raw: Any) -> None:
    store = local_keys_store
    ref = store.put(_msg("first"))
    name = store.name(ref.sha256)
    # A racing writer's PUT of the same name is refused (If-None-Match: *).
    assert store.s3.put_exclusive(store.bucket, name, b"forged") is None
    assert len(_versions(raw, store.bucket, name)) == 1
    assert store.read(ref.sha256) == _msg("first")


def test_a_blob_written_by_one_node_is_read_and_shredded_by_another(
        seaweed: Seaweed, keyring: KeyRing, tmp_path: Path) -> None:
    # Two nodes: their own data dirs, one bucket, one key bucket, the same archive keys.
    cfg = _cfg(seaweed, Seaweed.bucket_name("n"), key_bucket=Seaweed.bucket_name("nk"))
    with S3BlobStore.open(cfg, keyring, tmp_path / "a") as a, \
            S3BlobStore.open(cfg, keyring, tmp_path / "b") as b:
        ref = a.put(_msg("node-a"))
        assert b.read(ref.sha256) == _msg("node-a")
        assert not b.put(_msg("node-a")).new
        assert b.shred(ref.sha256) == 1
        with pytest.raises(BlobShreddedError):
            a.read(ref.sha256)


def test_the_archive_facade_runs_on_the_s3_store(seaweed: Seaweed, tmp_path: Path) -> None:
    paths = ArchivePaths(tmp_path)
    keys = KeyRing.open(paths.keys, create=True)
    blobs = S3BlobStore.open(_cfg(seaweed, Seaweed.bucket_name("f")), keys, tmp_path)
    ledger = Ledger(paths.ledger, signer=keys.signer)
    with Archive(paths, keys, blobs, ledger) as archive:  # type: ignore[arg-type]
        ref = archive.put(_msg("facade"), {"archive_id": "m1"})
        assert archive.get(ref.sha256) == _msg("facade")
        archive.shred(ref.sha256, reason="test")
        with pytest.raises(BlobShreddedError):
            archive.get(ref.sha256)
    kinds = [e.kind for e in ledger.entries()]
    assert kinds == ["message_stored", "tombstone"]


def test_a_bucket_without_object_lock_is_refused(seaweed: Seaweed, raw: Any,
                                                 keyring: KeyRing, tmp_path: Path) -> None:
    bucket = Seaweed.bucket_name("plain")
    raw.create_bucket(Bucket=bucket)
    with pytest.raises(BucketConfigError, match="Object Lock is not enabled"):
        S3BlobStore.open(_cfg(seaweed, bucket, create_bucket=False), keyring, tmp_path)
    with pytest.raises(BucketConfigError, match="bucket not found"):
        S3BlobStore.open(_cfg(seaweed, Seaweed.bucket_name("none"), create_bucket=False),
                         keyring, tmp_path)


# -- the ledger mirror ---------------------------------------------------------------------


def test_ledger_segments_and_checkpoints_mirror_to_locked_objects_and_back(
        seaweed: Seaweed, raw: Any, keyring: KeyRing, tmp_path: Path) -> None:
    cfg = _cfg(seaweed, Seaweed.bucket_name("l"))
    s3 = make_client(cfg)
    try:
        s3.check_bucket(cfg.bucket, locked=True, create=True)
        mirror = S3LedgerMirror(s3, cfg.bucket, retention=86400)
        ledger = Ledger(tmp_path / "ledger", signer=keyring.signer, segment_entries=5,
                        checkpoint_every=4)
        for i in range(17):
            ledger.append("audit", n=i)
        local = sorted((tmp_path / "ledger").glob("*.jsonl"))
        first = mirror.sync(tmp_path / "ledger")
        assert first.segments == [p.name for p in local[:-1]]  # the open one stays local
        assert first.checkpoints  # including those in the open segment
        assert mirror.verify(tmp_path / "ledger") == []
        assert mirror.sync(tmp_path / "ledger").segments == []  # idempotent

        copy = tmp_path / "from-s3"
        got = mirror.download(copy)
        assert [p.read_bytes() for p in got] == [p.read_bytes() for p in local[:-1]]
        v = Verifier(tmp_path, public_key=keyring.signer.public_key(), keyring=None)
        v.verify_ledger(copy)
        assert [f for f in v.findings if f.severity == "error"] == []

        # The locked copies cannot be removed ...
        key = f"ledger/segments/{local[0].name}"
        (version,) = _versions(raw, cfg.bucket, key)
        with pytest.raises(ClientError) as err:
            raw.delete_object(Bucket=cfg.bucket, Key=key, VersionId=version["VersionId"])
        assert err.value.response["Error"]["Code"] == "AccessDenied"
        # ... so a local edit after mirroring is caught.
        text = local[0].read_bytes().replace(b'"n":1', b'"n":9')
        os.chmod(local[0], 0o640)
        local[0].write_bytes(text)
        assert [p.code for p in mirror.verify(tmp_path / "ledger")] == ["segment_differs"]
        with pytest.raises(LedgerError, match="differs from its locked copy"):
            mirror.sync(tmp_path / "ledger")
    finally:
        s3.close()


# -- failures --------------------------------------------------------------------------------


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.timeout(30)
def test_unreachable_storage_is_a_clear_tempfail_error(seaweed: Seaweed, keyring: KeyRing,
                                                       tmp_path: Path) -> None:
    cfg = _cfg(seaweed, "coffer-archive", endpoint=f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(ObjectStoreUnavailableError, match="storage unreachable") as err:
        S3BlobStore.open(cfg, keyring, tmp_path)
    assert isinstance(err.value, ArchiveError)  # the gateway's tempfail path catches these
    assert seaweed.secret_key not in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__


@pytest.mark.timeout(30)
def test_a_server_that_never_answers_times_out_instead_of_hanging(
        seaweed: Seaweed, keyring: KeyRing, tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:  # accept and read nothing, answer nothing
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    t = threading.Thread(target=accept)
    t.start()
    try:
        cfg = _cfg(seaweed, "coffer-archive", read_timeout=0.5,
                   endpoint=f"http://127.0.0.1:{listener.getsockname()[1]}")
        with pytest.raises(ObjectStoreUnavailableError) as err:
            S3BlobStore.open(cfg, keyring, tmp_path)
        assert seaweed.secret_key not in str(err.value)
    finally:
        stop.set()
        t.join()
        for s in accepted:
            s.close()
        listener.close()


def test_a_rejected_request_never_shows_the_secret_key(
        seaweed: Seaweed, store: S3BlobStore, keyring: KeyRing, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    wrong = "Wr0ng" + seaweed.secret_key[5:]
    cfg = _cfg(seaweed, store.bucket, secret_access_key=wrong, create_bucket=False)
    assert wrong not in repr(cfg) and wrong not in str(cfg)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ObjectStoreError) as err:
        S3BlobStore.open(cfg, keyring, tmp_path)
    text = str(err.value)
    assert err.value.code in ("SignatureDoesNotMatch", "AccessDenied", "InvalidAccessKeyId",
                              "403")
    for secret in (wrong, seaweed.secret_key):
        assert secret not in text
        assert secret not in caplog.text


# -- configuration ---------------------------------------------------------------------------


def test_config_names_the_bad_bucket_and_pairs_the_credentials() -> None:
    with pytest.raises(ValidationError, match="not a valid S3 bucket name"):
        S3Config(bucket="Bad_Bucket")
    with pytest.raises(ValidationError, match="go together"):
        S3Config.model_validate({"bucket": "good", "access_key_id": "AK"})
    with pytest.raises(ValidationError, match="must differ"):
        S3Config(bucket="same", key_bucket="same")
    with pytest.raises(ValidationError, match="Extra inputs"):
        S3Config.model_validate({"bucket": "good", "buckett": "x"})


def test_a_secret_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "s3.secret"
    secret.write_text("s3cr3t-value\n")
    secret.chmod(0o644)
    cfg = S3Config.model_validate({"bucket": "good", "access_key_id": "AK",
                                   "secret_access_key_file": "s3.secret"})
    with pytest.raises(KeyFileError, match="chmod 600"):
        make_client(cfg, tmp_path)
    secret.chmod(0o600)
    assert cfg.secret(tmp_path) == "s3cr3t-value"
    make_client(cfg, tmp_path).close()


def test_legal_hold_cases_set_and_lift_s3_object_holds(seaweed: Seaweed, raw: Any,
                                                       tmp_path: Path) -> None:
    import hashlib
    from datetime import UTC, datetime

    from archive.extract import extract
    from archive.holds import create_hold, release_hold
    from archive.index import Indexer, open_index
    from archive.metadata import MessageRecord, Metadata
    from archive.search import Searcher

    cfg = _cfg(seaweed, Seaweed.bucket_name("h"))
    archive = Archive.open(tmp_path, s3=cfg)
    meta = Metadata(f"sqlite:///{tmp_path / 'meta.db'}")
    meta.migrate()
    index = open_index("fts5", data_dir=tmp_path, meta=meta)
    try:
        shas = {}
        for tag in ("merger", "lunch"):
            data = _msg(tag)
            archive.put(data)
            shas[tag] = hashlib.sha256(data).hexdigest()
            meta.add_message(MessageRecord(shas[tag], extract(data), datetime.now(UTC),
                                           mail_from="a@example.org", rcpt_to=["b@example.org"]))
        Indexer(meta, index, archive.get).run()
        store = archive.store
        assert isinstance(store, S3BlobStore)
        searcher = Searcher(meta, index)
        create_hold(meta, archive, searcher, "C-1", "body:merger", "olga")
        create_hold(meta, archive, searcher, "C-2", "subject:merger OR subject:lunch", "olga")
        assert store.lock_state(shas["merger"]).legal_hold
        assert store.lock_state(shas["lunch"]).legal_hold
        # The storage itself refuses to delete a held object, whatever asks.
        version = _versions(raw, cfg.bucket, store.name(shas["lunch"]))[0]["VersionId"]
        with pytest.raises(Exception, match=r"AccessDenied|locked|Lock"):
            raw.delete_object(Bucket=cfg.bucket, Key=store.name(shas["lunch"]),
                              VersionId=version, BypassGovernanceRetention=False)
        release_hold(meta, archive, "C-2", "olga")
        # C-1 still holds "merger"; nothing holds "lunch" any more.
        assert store.lock_state(shas["merger"]).legal_hold
        assert not store.lock_state(shas["lunch"]).legal_hold
        release_hold(meta, archive, "C-1", "olga")
        assert not store.lock_state(shas["merger"]).legal_hold
    finally:
        index.close()
        meta.close()
        archive.close()
