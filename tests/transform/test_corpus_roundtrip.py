"""The MIME corpus survives encrypt -> decrypt unchanged, through Coffer both ways.

A fixed sample (every n-th file, 40 in all) keeps the test fast; every file is
canonicalised to CRLF first, as SMTP would carry it.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptokit import corpus_dir, ctx_for, message, run_stage

from gateway.transform import mime
from gateway.transform.keystore import KeyStore

SAMPLE = 40
ORG = "signer@corp.test"


def sample() -> list[Path]:
    c = corpus_dir()
    root = c / "mime" if c else None
    if root is None or not root.exists():
        return []
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("LICENSE")
                   and p.stat().st_size < 512 * 1024)
    step = max(1, len(files) // SAMPLE)
    return files[::step][:SAMPLE]


def _fields_without_mime_version(data: bytes) -> list[bytes]:
    header, _ = mime.split(data)
    return sorted(f for f in mime.fields(header) if mime.field_name(f) != "mime-version")


@pytest.mark.parametrize("method,capabilities", [
    ("pgp", None),
    ("smime", None),  # AES-256-CBC enveloped-data
    ("smime", ["aes256-gcm"]),  # AES-256-GCM authEnveloped-data
])
async def test_corpus_sample_survives_encrypt_then_decrypt_byte_for_byte(
        store: KeyStore, data_dir: Path, method: str, capabilities: list[str] | None) -> None:
    files = sample()
    if not files:
        pytest.skip("MIME corpus not found: set COFFER_CORPUS or check out ../shared/corpus")
    if capabilities:
        (org,) = [k for k in store.find(ORG) if k.kind == "x509"]
        store.set_capabilities(org.id, capabilities)
    action = {"action": "encrypt", "method": method, "require": True}
    checked = 0
    for path in files:
        original = mime.crlf(path.read_bytes())
        if mime.encryption_of(original) is not None:
            continue  # already encrypted: left alone by design
        out = await run_stage(store, data_dir, ctx_for(original, [ORG], [action]))
        assert out.data is not None, path
        assert mime.encryption_of(out.data) == method, path
        if method == "smime":
            assert out.facts["cipher"] == ("aes-256-gcm" if capabilities else "aes-256-cbc")
        back = await run_stage(store, data_dir, ctx_for(out.data, [ORG], [],
                                                        direction="inbound"))
        entity = base64.b64decode(back.facts["decrypted"])
        assert entity == mime.protect(original).entity, path
        # The reader's view: the same header fields (moved, not changed) and body.
        restored = mime.unwrap(out.data, entity)
        assert _fields_without_mime_version(restored) == _fields_without_mime_version(
            original), path
        assert mime.split(restored)[1] == mime.split(original)[1], path
        checked += 1
    assert checked >= len(files) - 2


async def test_a_non_ascii_and_bare_body_message_round_trips(
        store: KeyStore, data_dir: Path) -> None:
    original = message(body="Grüße, 42 € — naïve\r\n".encode())
    out = await run_stage(store, data_dir, ctx_for(original, [ORG], [
        {"action": "encrypt", "method": "pgp", "require": True}]))
    assert out.data is not None
    back = await run_stage(store, data_dir, ctx_for(out.data, [ORG], [], direction="inbound"))
    assert base64.b64decode(back.facts["decrypted"]) == mime.protect(original).entity
