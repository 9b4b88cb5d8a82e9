"""S/MIME (RFC 8551) through the transform stage, checked with the real openssl."""

from __future__ import annotations

import base64
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptokit import (
    Identities,
    corpus_dir,
    crypto_config,
    ctx_for,
    fast_agent,
    kill_agent,
    message,
    run_stage,
)

from gateway.pipeline import Action
from gateway.transform import mime
from gateway.transform.config import CryptoConfig
from gateway.transform.encrypt_stage import EncryptStage
from gateway.transform.keystore import KeyStore

ENCRYPT_SMIME = {"action": "encrypt", "method": "smime", "require": True, "rule": "r"}
SIGN_SMIME = {"action": "sign", "method": "smime", "rule": "r"}
# thunderbird-signed.txt was signed on 2 Nov 2013; its StartCom chain expired in 2017.
THUNDERBIRD_SIGNED_AT = 1383424084


# Note: `openssl cms -verify -binary` on S/MIME input keeps the CR of the CRLF that
# belongs to the boundary, so verification of multipart/signed uses the text mode.
def openssl(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    r = subprocess.run(["openssl", *args], input=input, capture_output=True, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return r


def cms_decrypt(data: bytes, who: str, ids: Identities) -> bytes:
    sid = ids.smime[who]
    return openssl("cms", "-decrypt", "-binary", "-recip", str(sid.cert_pem), "-inkey",
                   str(sid.key_pem), input=data).stdout


def cms_print(data: bytes) -> str:
    """``openssl cms -cmsout -print`` of an S/MIME message's CMS structure."""
    return openssl("cms", "-cmsout", "-print", "-noout", "-inform", "DER",
                   input=mime.smime_der(data)).stdout.decode()


def cert_id(who: str, ids: Identities) -> str:
    return ids.smime[who].cert.fingerprint(hashes.SHA256()).hex()


async def test_unknown_capabilities_get_aes256_cbc_with_rsaes_oaep_sha256(
        store: KeyStore, data_dir: Path, identities: Identities) -> None:
    data = message(to="dave@smime.test")
    res = await run_stage(store, data_dir, ctx_for(data, ["dave@smime.test"], [ENCRYPT_SMIME]))
    assert res.action is Action.CONTINUE and res.data is not None
    assert mime.encryption_of(res.data) == "smime"
    assert mime.content_type(res.data)[1]["smime-type"] == "enveloped-data"
    assert b"secret figure" not in res.data
    assert cms_decrypt(res.data, "dave@smime.test", identities) == mime.protect(data).entity
    printed = cms_print(res.data)
    assert "pkcs7-envelopedData (1.2.840.113549.1.7.3)" in printed
    assert "aes-256-cbc (2.16.840.1.101.3.4.1.42)" in printed
    assert "rsaesOaep (1.2.840.113549.1.1.7)" in printed
    # RFC 3560 §2.1 rSAES-OAEP-SHA256-Identifier: SHA-256, MGF1 with SHA-256.
    parsed = openssl("asn1parse", "-inform", "DER", input=mime.smime_der(res.data)).stdout
    after = parsed.decode().split(":rsaesOaep", 1)[1].splitlines()[1:]
    assert [ln.split(":")[-1].strip() for ln in after if "OBJECT" in ln][:3] == [
        "sha256", "mgf1", "sha256"]
    assert res.facts["cipher"] == "aes-256-cbc"
    assert res.facts["key_transport"] == {cert_id("dave@smime.test", identities): "rsaes-oaep"}


async def test_recipient_announcing_gcm_gets_auth_enveloped_data_openssl_decrypts(
        store: KeyStore, data_dir: Path, identities: Identities) -> None:
    store.set_capabilities(cert_id("dave@smime.test", identities), ["aes256-gcm", "aes256-cbc"])
    data = message(to="dave@smime.test")
    res = await run_stage(store, data_dir, ctx_for(data, ["dave@smime.test"], [ENCRYPT_SMIME]))
    assert res.data is not None and b"secret figure" not in res.data
    # RFC 8551 §3.2.2 / RFC 5083: AEAD content goes in authEnveloped-data.
    assert mime.content_type(res.data)[1]["smime-type"] == "authEnveloped-data"
    assert mime.encryption_of(res.data) == "smime"
    assert mime.cms_content_type(mime.smime_der(res.data)) == mime.AUTH_ENVELOPED_DATA
    printed = cms_print(res.data)
    assert "(2.16.840.1.101.3.4.1.46)" in printed  # id-aes256-GCM (RFC 5084)
    assert "rsaesOaep (1.2.840.113549.1.1.7)" in printed
    assert cms_decrypt(res.data, "dave@smime.test", identities) == mime.protect(data).entity
    assert res.facts["cipher"] == "aes-256-gcm"


async def test_tampered_gcm_ciphertext_is_refused_by_openssl(
        store: KeyStore, data_dir: Path, identities: Identities) -> None:
    store.set_capabilities(cert_id("dave@smime.test", identities), ["aes256-gcm"])
    res = await run_stage(store, data_dir, ctx_for(message(to="dave@smime.test"),
                                                   ["dave@smime.test"], [ENCRYPT_SMIME]))
    assert res.data is not None
    der = bytearray(mime.smime_der(res.data))
    der[-30] ^= 1  # in the encrypted content, just before the 16-byte tag (RFC 5083 mac)
    sid = identities.smime["dave@smime.test"]
    r = subprocess.run(["openssl", "cms", "-decrypt", "-binary", "-inform", "DER", "-recip",
                        str(sid.cert_pem), "-inkey", str(sid.key_pem)], input=bytes(der),
                       capture_output=True, timeout=60, check=False)
    assert r.returncode != 0


@pytest.mark.parametrize("erin_caps,cipher", [
    (None, "aes-256-cbc"),  # erin unknown: CBC, which both read
    (["aes256-cbc", "aes128-cbc"], "aes-256-cbc"),  # erin announced CBC only
    (["aes128-gcm"], "aes-256-gcm"),  # S/MIME 4.0 agents read both GCM sizes (§2.7)
])
async def test_two_recipients_get_the_cipher_both_can_read(
        store: KeyStore, data_dir: Path, identities: Identities, erin_caps: list[str] | None,
        cipher: str) -> None:
    store.set_capabilities(cert_id("dave@smime.test", identities), ["aes256-gcm"])
    if erin_caps:
        store.set_capabilities(cert_id("erin@smime.test", identities), erin_caps)
    data = message(to="dave@smime.test, erin@smime.test")
    res = await run_stage(store, data_dir, ctx_for(
        data, ["dave@smime.test", "erin@smime.test"], [ENCRYPT_SMIME]))
    assert res.data is not None and res.facts["cipher"] == cipher
    assert f"{cipher} (" in cms_print(res.data)
    for who in ("dave@smime.test", "erin@smime.test"):
        assert cms_decrypt(res.data, who, identities) == mime.protect(data).entity


async def test_sign_then_encrypt_verifies_with_openssl_cms(
        store: KeyStore, data_dir: Path, identities: Identities, tmp_path: Path) -> None:
    assert identities.ca is not None
    data = message(to="dave@smime.test")
    res = await run_stage(store, data_dir, ctx_for(data, ["dave@smime.test"],
                                                   [ENCRYPT_SMIME, SIGN_SMIME]))
    assert res.data is not None and res.facts["signed"] == "smime"
    inner = cms_decrypt(res.data, "dave@smime.test", identities)
    assert mime.signature_of(inner) == "smime"
    content = openssl("cms", "-verify", "-CAfile", str(identities.ca.cert_pem),
                      input=inner).stdout
    assert content == mime.protect(data).entity


async def test_detached_signature_verifies_with_openssl_and_in_coffer(
        store: KeyStore, data_dir: Path, identities: Identities) -> None:
    assert identities.ca is not None
    data = message(to="dave@smime.test")
    res = await run_stage(store, data_dir, ctx_for(data, ["dave@smime.test"], [SIGN_SMIME]))
    assert res.data is not None and mime.signature_of(res.data) == "smime"
    content = openssl("cms", "-verify", "-CAfile", str(identities.ca.cert_pem),
                      input=res.data).stdout
    assert content == mime.protect(data).entity
    stage = EncryptStage(store, crypto_config(data_dir,
                                              smime_trust_anchors=identities.ca.cert_pem))
    back = await stage.run(ctx_for(res.data, ["x@corp.test"], [], direction="inbound"))
    sig = back.facts["signature"]
    assert sig["valid"] is True and sig["trusted"] is True
    assert sig["addresses"] == ["signer@corp.test"]


async def test_tampered_signed_message_is_reported_invalid(
        store: KeyStore, data_dir: Path) -> None:
    data = message(to="dave@smime.test")
    res = await run_stage(store, data_dir, ctx_for(data, ["dave@smime.test"], [SIGN_SMIME]))
    assert res.data is not None
    forged = res.data.replace(b"The secret figure is 42.", b"The secret figure is 43.")
    back = await run_stage(store, data_dir, ctx_for(forged, ["x@corp.test"], []))
    assert back.facts["signature"]["valid"] is False


@pytest.mark.parametrize("cipher,keyopt", [
    ("-aes-256-cbc", []),
    ("-aes-256-gcm", []),  # authEnveloped-data (RFC 5083): decrypted through openssl
    ("-aes-128-cbc", ["-keyopt", "rsa_padding_mode:oaep"]),  # RSAES-OAEP key transport
])
async def test_inbound_smime_made_by_openssl_is_decrypted_for_the_archive(
        store: KeyStore, data_dir: Path, identities: Identities, cipher: str,
        keyopt: list[str]) -> None:
    org = identities.smime["signer@corp.test"]
    entity = b"Content-Type: text/plain; charset=us-ascii\r\n\r\nInbound, for the archive.\r\n"
    recip = ["-recip", str(org.cert_pem), *keyopt] if keyopt else [str(org.cert_pem)]
    der = openssl("cms", "-encrypt", "-binary", cipher, "-outform", "DER", *recip,
                  input=entity).stdout
    smime_type = "authEnveloped-data" if "gcm" in cipher else "enveloped-data"
    data = mime.smime_enveloped([b"From: dave@smime.test\r\n", b"To: signer@corp.test\r\n"],
                                der, smime_type)
    res = await run_stage(store, data_dir, ctx_for(data, ["signer@corp.test"], [],
                                                   sender="dave@smime.test",
                                                   direction="inbound"))
    assert res.data is None, "the recipient gets the message as sent"
    assert res.facts["already_encrypted"] == "smime"
    assert base64.b64decode(res.facts["decrypted"]) == entity


def _corpus(*parts: str) -> Path:
    c = corpus_dir()
    p = c.joinpath("smime-pgp", *parts) if c else None
    if p is None or not p.exists():
        pytest.skip("test corpus not found: set COFFER_CORPUS or check out ../shared/corpus")
    return p


async def test_corpus_pkcs12_key_decrypts_mail_openssl_encrypted_to_it(
        store: KeyStore, data_dir: Path, tmp_path: Path) -> None:
    pfx = _corpus("smime", "rsa", "smime.pfx")
    store.import_file(pfx, password=b"no.secret")
    cert = tmp_path / "rsa.crt"
    cert.write_bytes(openssl("pkcs12", "-in", str(pfx), "-passin", "pass:no.secret",
                             "-nokeys", "-clcerts", "-legacy").stdout)
    entity = b"Content-Type: text/plain\r\n\r\nTo the MimeKit test key.\r\n"
    der = openssl("cms", "-encrypt", "-binary", "-aes256", "-outform", "DER", str(cert),
                  input=entity).stdout
    data = mime.smime_enveloped([b"To: rsa@mimekit.net\r\n"], der)
    res = await run_stage(store, data_dir, ctx_for(data, ["rsa@mimekit.net"], []))
    assert base64.b64decode(res.facts["decrypted"]) == entity


async def test_thunderbird_signed_mail_verifies_at_its_signing_time(
        store: KeyStore, data_dir: Path, tmp_path: Path) -> None:
    msg = _corpus("smime", "thunderbird-signed.txt")
    anchors = tmp_path / "startcom.pem"
    anchors.write_bytes(b"".join(_corpus("smime", n).read_bytes() for n in (
        "StartComCertificationAuthority.crt", "StartComClass1PrimaryIntermediateClientCA.crt")))
    cfg = CryptoConfig.model_validate({**crypto_config(data_dir).model_dump(),
                                       "smime_trust_anchors": anchors})
    stage = EncryptStage(store, cfg, verify_attime=lambda: THUNDERBIRD_SIGNED_AT)
    data = mime.crlf(msg.read_bytes())
    res = await stage.run(ctx_for(data, ["fejj@gnome.org"], [], direction="inbound"))
    sig = res.facts["signature"]
    assert sig["valid"] is True and sig["trusted"] is True, sig
    assert sig["addresses"] == ["fejj@gnome.org"]


async def test_gpgsm_decrypts_cbc_with_pkcs1_key_transport_set_by_the_operator(
        store: KeyStore, data_dir: Path, identities: Identities, tmp_path: Path) -> None:
    """gpgsm 2.2.40 (Debian 12) reads neither RSAES-OAEP key transport ("error getting
    encrypted session key") nor authEnveloped-data ("error getting IV"): for its
    users the operator records ``aes256-cbc,rsaes-pkcs1v15``, and gpgsm decrypts."""
    dave = identities.smime["dave@smime.test"]
    store.set_capabilities(cert_id("dave@smime.test", identities),
                           ["aes256-cbc", "rsaes-pkcs1v15"])
    data = message(to="dave@smime.test")
    res = await run_stage(store, data_dir, ctx_for(data, ["dave@smime.test"], [ENCRYPT_SMIME]))
    assert res.data is not None
    assert res.facts["key_transport"] == {cert_id("dave@smime.test", identities):
                                          "rsaes-pkcs1v15"}
    assert "rsaesOaep" not in cms_print(res.data)
    # gpgsm reads PKCS#12 with the older (legacy) encryption only.
    p12 = tmp_path / "dave.p12"
    openssl("pkcs12", "-export", "-legacy", "-inkey", str(dave.key_pem), "-in",
            str(dave.cert_pem), "-out", str(p12), "-passout", "pass:pw")
    home = Path(tempfile.mkdtemp(prefix="gs", dir=identities.root))
    home.chmod(0o700)
    fast_agent(home)
    base = ["gpgsm", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback",
            "--passphrase-fd", "0", "--disable-crl-checks"]
    try:
        imp = subprocess.run([*base, "--import", str(p12)], input=b"pw\n", capture_output=True,
                             timeout=60, check=False)
        assert imp.returncode == 0, imp.stderr
        (tmp_path / "m.der").write_bytes(mime.smime_der(res.data))
        dec = subprocess.run([*base, "--decrypt", str(tmp_path / "m.der")], input=b"pw\n",
                             capture_output=True, timeout=60, check=False)
        assert dec.returncode == 0, dec.stderr
        assert dec.stdout == mime.protect(data).entity
    finally:
        kill_agent(home)
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.parametrize("encrypt", [False, True], ids=["sign", "sign-then-encrypt"])
async def test_opaque_signing_yields_signed_data_that_openssl_verifies_to_the_entity(
        store: KeyStore, data_dir: Path, identities: Identities, encrypt: bool) -> None:
    assert identities.ca is not None
    data = message(to="dave@smime.test")
    rules = [ENCRYPT_SMIME, SIGN_SMIME] if encrypt else [SIGN_SMIME]
    res = await run_stage(store, data_dir, ctx_for(data, ["dave@smime.test"], rules),
                          smime_signing="opaque")
    assert res.data is not None and res.facts["signed"] == "smime"
    signed = cms_decrypt(res.data, "dave@smime.test", identities) if encrypt else res.data
    # RFC 8551 §3.5.2: one application/pkcs7-mime part, no readable multipart/signed.
    assert mime.content_type(signed)[0] == "application/pkcs7-mime"
    assert mime.signature_of(signed) == "smime"
    assert b"multipart/signed" not in signed
    content = openssl("cms", "-verify", "-binary", "-inform", "DER", "-CAfile",
                      str(identities.ca.cert_pem), input=mime.smime_der(signed)).stdout
    assert content == mime.protect(data).entity
