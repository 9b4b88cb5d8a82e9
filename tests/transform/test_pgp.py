"""PGP/MIME (RFC 3156) through the transform stage, checked with the real gpg."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptokit import ORG_PASS, Identities, corpus_dir, ctx_for, gpg, message, run_stage

from gateway.pipeline import Action
from gateway.transform import mime
from gateway.transform.keystore import KeyStore

ENCRYPT_PGP = {"action": "encrypt", "method": "pgp", "require": True, "rule": "r"}
SIGN_PGP = {"action": "sign", "method": "pgp", "rule": "r"}




def gpg_decrypt(home: Path, armored: bytes) -> tuple[bytes, str]:
    r = gpg(home, "--decrypt", input=armored)
    return r.stdout, r.stderr.decode()


async def test_encrypted_message_decrypts_with_gpg_to_the_original_entity(
        store: KeyStore, data_dir: Path, identities: Identities) -> None:
    data = message()
    res = await run_stage(store, data_dir, ctx_for(data, ["bob@partner.test"], [ENCRYPT_PGP]))
    assert res.action is Action.CONTINUE and res.data is not None
    assert mime.encryption_of(res.data) == "pgp"
    assert b"secret figure" not in res.data
    out, _ = gpg_decrypt(identities.pgp["bob@partner.test"].home, mime.pgp_ciphertext(res.data))
    assert out == mime.protect(data).entity
    # Outside: the routing headers, no Content-* of the original.
    head, _ = mime.split(res.data)
    assert b"Subject: Quarterly numbers" in head and b"text/plain" not in head
    assert res.facts["encrypted"] == "pgp"


async def test_one_message_for_several_recipients_opens_for_each(
        store: KeyStore, data_dir: Path, identities: Identities) -> None:
    data = message(to="bob@partner.test, carol@partner.test")
    res = await run_stage(store, data_dir, ctx_for(
        data, ["bob@partner.test", "carol@partner.test"], [ENCRYPT_PGP]))
    assert res.data is not None
    for who in ("bob@partner.test", "carol@partner.test"):
        out, _ = gpg_decrypt(identities.pgp[who].home, mime.pgp_ciphertext(res.data))
        assert out == mime.protect(data).entity


async def test_sign_then_encrypt_verifies_with_gpg(
        store: KeyStore, data_dir: Path, identities: Identities) -> None:
    signer = identities.pgp["signer@corp.test"]
    home = identities.pgp["bob@partner.test"].home
    gpg(home, "--import", input=signer.public)
    data = message()
    res = await run_stage(store, data_dir, ctx_for(data, ["bob@partner.test"],
                                                   [ENCRYPT_PGP, SIGN_PGP]))
    assert res.data is not None and res.facts["signed"] == "pgp"
    out, status = gpg_decrypt(home, mime.pgp_ciphertext(res.data))
    assert out == mime.protect(data).entity
    assert f"VALIDSIG {signer.fingerprint}" in status


async def test_detached_signature_verifies_with_gpg_verify(
        store: KeyStore, data_dir: Path, identities: Identities, tmp_path: Path) -> None:
    signer = identities.pgp["signer@corp.test"]
    data = message()
    res = await run_stage(store, data_dir, ctx_for(data, ["bob@partner.test"], [SIGN_PGP]))
    assert res.data is not None and mime.signature_of(res.data) == "pgp"
    _, params = mime.content_type(res.data)
    assert params["micalg"] == "pgp-sha256"
    signed, sig = mime.signed_parts(res.data)
    assert signed == mime.protect(data).entity
    (tmp_path / "m").write_bytes(signed)
    (tmp_path / "m.asc").write_bytes(sig)
    r = gpg(signer.home, "--verify", str(tmp_path / "m.asc"), str(tmp_path / "m"))
    assert f"VALIDSIG {signer.fingerprint}" in r.stderr.decode()
    # And Coffer's own inbound verification agrees.
    res2 = await run_stage(store, data_dir, ctx_for(res.data, ["x@corp.test"], []))
    assert res2.facts["signature"]["valid"] is True
    assert res2.facts["signature"]["fingerprint"] == signer.fingerprint


async def test_protected_headers_hide_the_subject_and_carry_it_inside(
        store: KeyStore, data_dir: Path, identities: Identities) -> None:
    data = message(subject="Merger with ACME")
    res = await run_stage(store, data_dir, ctx_for(data, ["bob@partner.test"], [ENCRYPT_PGP]),
                          protected_headers=True)
    assert res.data is not None
    head, _ = mime.split(res.data)
    assert b"Subject: [...]" in head and b"ACME" not in res.data
    out, _ = gpg_decrypt(identities.pgp["bob@partner.test"].home, mime.pgp_ciphertext(res.data))
    inner_head, inner_body = mime.split(out)
    assert b'hp="cipher"' in inner_head
    assert b"Subject: Merger with ACME\r\n" in inner_head
    assert b"HP-Outer: Subject: [...]\r\n" in inner_head
    assert inner_body == mime.split(data)[1]


async def test_inbound_pgp_mime_made_by_gpg_is_decrypted_for_the_archive(
        store: KeyStore, data_dir: Path, identities: Identities) -> None:
    org = identities.pgp["signer@corp.test"]
    bob = identities.pgp["bob@partner.test"]
    gpg(bob.home, "--import", input=org.public)
    entity = b"Content-Type: text/plain; charset=us-ascii\r\n\r\nFor the archive.\r\n"
    armored = gpg(bob.home, "--armor", "--trust-model", "always", "--encrypt", "--sign",
                  "-r", org.fingerprint, input=entity).stdout
    data = mime.pgp_encrypted([b"From: bob@partner.test\r\n", b"To: signer@corp.test\r\n",
                               b"Subject: hi\r\n"], armored)
    ctx = ctx_for(data, ["signer@corp.test"], [], sender="bob@partner.test",
                  direction="inbound")
    res = await run_stage(store, data_dir, ctx)
    assert res.action is Action.CONTINUE and res.data is None  # delivered as received
    assert base64.b64decode(res.facts["transform" if False else "decrypted"]) == entity
    assert res.facts["already_encrypted"] == "pgp"
    assert res.facts["signature"]["fingerprint"] == bob.fingerprint
    unwrapped = mime.unwrap(data, entity)
    assert unwrapped.endswith(entity) and b"multipart/encrypted" not in unwrapped


async def test_efail_openpgp_without_mdc_is_refused_and_no_plaintext_kept(
        store: KeyStore, data_dir: Path, identities: Identities) -> None:
    org = identities.pgp["signer@corp.test"]
    bob = identities.pgp["bob@partner.test"]
    gpg(bob.home, "--import", input=org.public)
    # --rfc2440 makes gpg write a Symmetrically Encrypted Data packet without an MDC.
    armored = gpg(bob.home, "--armor", "--trust-model", "always", "--rfc2440",
                  "--cipher-algo", "AES256", "--encrypt", "-r", org.fingerprint,
                  input=b"Content-Type: text/plain\r\n\r\nEFAIL canary\r\n").stdout
    data = mime.pgp_encrypted([b"From: bob@partner.test\r\n"], armored)
    res = await run_stage(store, data_dir, ctx_for(data, ["signer@corp.test"], [],
                                                   direction="inbound"))
    assert res.facts["integrity"] is False
    assert "decrypted" not in res.facts
    assert "EFAIL canary" not in repr(res.facts)


async def test_message_to_a_key_we_do_not_hold_is_delivered_untouched(
        store: KeyStore, data_dir: Path, identities: Identities) -> None:
    bob = identities.pgp["bob@partner.test"]
    armored = gpg(bob.home, "--armor", "--trust-model", "always", "--encrypt",
                  "-r", bob.fingerprint, input=b"\r\nnot ours\r\n").stdout
    data = mime.pgp_encrypted([b"From: x@y.test\r\n"], armored)
    res = await run_stage(store, data_dir, ctx_for(data, ["bob@partner.test"], [ENCRYPT_PGP]))
    assert res.action is Action.CONTINUE and res.data is None
    assert "decrypted" not in res.facts and "decrypt_error" in res.facts


def test_passphrase_is_needed_for_org_signing_key(data_dir: Path) -> None:
    # Sanity of the fixture: the org key really is passphrase-protected.
    assert ORG_PASS


@pytest.mark.parametrize("name", ["gnupg-2.1.20-announce-signed.eml"])
async def test_real_pgp_signed_mail_from_corpus_verifies(
        store: KeyStore, data_dir: Path, name: str) -> None:
    c = corpus_dir()
    path = c / "smime-pgp" / "openpgp" / name if c else None
    if path is None or not path.exists():
        pytest.skip("test corpus not found: set COFFER_CORPUS or check out ../shared/corpus")
    data = mime.crlf(path.read_bytes())
    # A list message: the signed part first, the list footer after it.
    assert mime.signature_of(data) is None
    found = mime.signed_entity(data)
    assert found is not None and found[0] == "pgp" and found[2] is False
    res = await run_stage(store, data_dir, ctx_for(data, ["x@corp.test"], []))
    sig = res.facts["signature"]
    # We do not hold the GnuPG release keys: checked, but no key to verify with.
    assert sig["method"] == "pgp" and sig["valid"] is False and sig["scope"] == "first part"
    assert sig["key_id"]


async def test_message_the_sender_already_encrypted_passes_untouched_even_under_require(
        store: KeyStore, data_dir: Path, identities: Identities) -> None:
    bob = identities.pgp["bob@partner.test"]
    armored = gpg(bob.home, "--armor", "--trust-model", "always", "--encrypt",
                  "-r", bob.fingerprint, input=b"\r\nclient-side encrypted\r\n").stdout
    data = mime.pgp_encrypted([b"From: signer@corp.test\r\n"], armored)
    res = await run_stage(store, data_dir, ctx_for(data, ["nokey@elsewhere.test"],
                                                   [ENCRYPT_PGP, SIGN_PGP]))
    assert res.action is Action.CONTINUE and res.data is None
    assert res.facts["already_encrypted"] == "pgp"


async def test_sign_without_a_signing_key_holds_for_an_operator(
        store: KeyStore, data_dir: Path) -> None:
    res = await run_stage(store, data_dir, ctx_for(message(), ["bob@partner.test"], [SIGN_PGP],
                                                   sender="intern@other.test"))
    assert res.action is Action.HOLD and res.data is None
    assert "no usable pgp signing key for intern@other.test" in res.reason
