"""S/MIME capabilities (RFC 8551 §2.5.2, §2.7.1): learned from real signed mail, set by
the operator with ``coffer keys import --capabilities``, and what they choose."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptokit import Identities, crypto_config, ctx_for, kill_agent, message, run_stage

from gateway.cli import main
from gateway.transform import mime, smime_caps
from gateway.transform.encrypt_stage import EncryptStage
from gateway.transform.errors import KeyStoreError
from gateway.transform.keystore import KeyStore

ENCRYPT_SMIME = {"action": "encrypt", "method": "smime", "require": True, "rule": "r"}
# What `openssl cms -sign` (OpenSSL 3.0) announces by default (CMS_add_standard_smimecap).
OPENSSL_DEFAULT = ["aes256-cbc", "aes192-cbc", "aes128-cbc", "des-ede3-cbc", "rc2-cbc",
                   "des-cbc"]


def cert_id(who: str, ids: Identities) -> str:
    return ids.smime[who].cert.fingerprint(hashes.SHA256()).hex()


def signed_by(who: str, ids: Identities, tmp: Path, *extra: str) -> bytes:
    """A message ``who`` signed with the real ``openssl cms -sign`` (chain via -certfile)."""
    assert ids.ca is not None
    sid = ids.smime[who]
    entity = b"Content-Type: text/plain; charset=us-ascii\r\n\r\nSigned by the partner.\r\n"
    (tmp / "entity").write_bytes(entity)
    r = subprocess.run(["openssl", "cms", "-sign", "-binary", "-in", str(tmp / "entity"),
                        "-signer", str(sid.cert_pem), "-inkey", str(sid.key_pem),
                        "-certfile", str(ids.ca.cert_pem), *extra],
                       capture_output=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    head = f"From: {who}\r\nTo: signer@corp.test\r\nSubject: hello\r\n".encode()
    return head + mime.crlf(r.stdout)


async def inbound(store: KeyStore, data_dir: Path, data: bytes,
                  ids: Identities) -> dict[str, object]:
    assert ids.ca is not None
    stage = EncryptStage(store, crypto_config(data_dir, smime_trust_anchors=ids.ca.cert_pem))
    res = await stage.run(ctx_for(data, ["signer@corp.test"], [], sender="dave@smime.test",
                                  direction="inbound"))
    sig = res.facts["signature"]
    assert isinstance(sig, dict)
    return sig


async def test_capabilities_of_a_verified_openssl_signed_message_are_recorded_and_used(
        store: KeyStore, data_dir: Path, identities: Identities, tmp_path: Path) -> None:
    dave = cert_id("dave@smime.test", identities)
    sig = await inbound(store, data_dir, signed_by("dave@smime.test", identities, tmp_path),
                        identities)
    assert sig["valid"] is True and sig["trusted"] is True
    assert sig["capabilities"] == OPENSSL_DEFAULT
    assert sig["capabilities_recorded"] == "recorded"
    caps = store.capabilities(dave)
    assert caps is not None and caps.source == "signed message"
    assert caps.capabilities == OPENSSL_DEFAULT and caps.signing_time == sig["signing_time"]
    # No GCM announced: the next message to dave is AES-256-CBC.
    res = await run_stage(store, data_dir, ctx_for(message(to="dave@smime.test"),
                                                   ["dave@smime.test"], [ENCRYPT_SMIME]))
    assert res.facts["cipher"] == "aes-256-cbc"


async def test_a_replayed_signed_message_does_not_replace_the_recorded_list(
        store: KeyStore, data_dir: Path, identities: Identities, tmp_path: Path) -> None:
    data = signed_by("dave@smime.test", identities, tmp_path)
    assert (await inbound(store, data_dir, data, identities))["capabilities_recorded"] == \
        "recorded"
    replay = await inbound(store, data_dir, data, identities)
    assert replay["capabilities_recorded"] == "not recorded: not newer than the recorded list"


async def test_operator_setting_is_kept_over_what_signed_mail_announces(
        store: KeyStore, data_dir: Path, identities: Identities, tmp_path: Path) -> None:
    dave = cert_id("dave@smime.test", identities)
    store.set_capabilities(dave, ["aes256-gcm"])
    sig = await inbound(store, data_dir, signed_by("dave@smime.test", identities, tmp_path),
                        identities)
    assert sig["capabilities_recorded"] == "not recorded: set by the operator"
    caps = store.capabilities(dave)
    assert caps is not None and caps.capabilities == ["aes256-gcm"]


async def test_nothing_is_learned_from_a_tampered_or_capability_free_signature(
        store: KeyStore, data_dir: Path, identities: Identities, tmp_path: Path) -> None:
    dave = cert_id("dave@smime.test", identities)
    forged = signed_by("dave@smime.test", identities, tmp_path).replace(
        b"Signed by the partner.", b"Signed by the forger!.")
    sig = await inbound(store, data_dir, forged, identities)
    assert sig["valid"] is False and "capabilities" not in sig
    bare = await inbound(store, data_dir, signed_by("dave@smime.test", identities, tmp_path,
                                                    "-nosmimecap"), identities)
    assert bare["valid"] is True and "capabilities" not in bare
    assert store.capabilities(dave) is None


async def test_capabilities_of_a_signer_not_in_the_key_store_are_not_kept(
        store: KeyStore, data_dir: Path, identities: Identities, tmp_path: Path) -> None:
    store.remove(cert_id("erin@smime.test", identities))
    sig = await inbound(store, data_dir, signed_by("erin@smime.test", identities, tmp_path),
                        identities)
    assert sig["valid"] is True
    assert sig["capabilities_recorded"] == \
        "not recorded: the signer's certificate is not in the key store"


def test_parse_print_takes_capability_ids_not_their_parameters() -> None:
    # The shape `openssl cms -cmsout -print` gives a signed attribute (OAEP with
    # SHA-256 parameters, then GCM, then an OID openssl has no name for).
    printed = "\n".join([
        "    signerInfos:",
        "            object: signingTime (1.2.840.113549.1.9.5)",
        "            set:",
        "              UTCTIME:Nov  7 08:05:09 2026 GMT",
        "",
        "            object: S/MIME Capabilities (1.2.840.113549.1.9.15)",
        "            set:",
        "              SEQUENCE:",
        "    0:d=0  hl=2 l=  80 cons: SEQUENCE          ",
        "    2:d=1  hl=2 l=  11 cons:  SEQUENCE          ",
        "    4:d=2  hl=2 l=   9 prim:   OBJECT            :aes-256-gcm",
        "   15:d=1  hl=2 l=  52 cons:  SEQUENCE          ",
        "   17:d=2  hl=2 l=   9 prim:   OBJECT            :rsaesOaep",
        "   28:d=2  hl=2 l=  43 cons:   SEQUENCE          ",
        "   32:d=4  hl=2 l=   9 prim:     OBJECT            :sha256",
        "   60:d=1  hl=2 l=  13 cons:  SEQUENCE          ",
        "   62:d=2  hl=2 l=  11 prim:   OBJECT            :1.2.840.113549.1.9.16.3.18",
        "   75:d=1  hl=2 l=  11 cons:  SEQUENCE          ",
        "   77:d=2  hl=2 l=   9 prim:   OBJECT            :1.2.3.4.5",
        "        signatureAlgorithm: ",
        "          algorithm: rsaEncryption (1.2.840.113549.1.1.1)",
    ])
    got = smime_caps.parse_print(printed)
    assert got is not None
    assert got.capabilities == ["aes256-gcm", "rsaes-oaep", "chacha20-poly1305", "1.2.3.4.5"]
    assert got.signing_time is not None and got.signing_time.isoformat() == \
        "2026-11-07T08:05:09+00:00"
    assert smime_caps.parse_print(printed.split("            object: S/MIME")[0]) is None


@pytest.mark.parametrize("lists,cipher,oaep", [
    ([None], "aes-256-cbc", (True,)),  # unknown: CBC, OAEP
    ([["aes256-gcm"]], "aes-256-gcm", (True,)),
    ([["aes256-gcm"], None], "aes-256-cbc", (True, True)),  # one unknown: CBC for all
    ([["aes256-cbc", "rsaes-pkcs1v15"]], "aes-256-cbc", (False,)),
    ([["aes128-gcm", "rsaes-oaep", "rsaes-pkcs1v15"]], "aes-256-gcm", (True,)),
    ([["aes256-gcm", "rsaEncryption"]], "aes-256-gcm", (True,)),  # not our name: ignored
])
def test_choose_takes_what_every_recipient_reads(
        lists: list[list[str] | None], cipher: str, oaep: tuple[bool, ...]) -> None:
    plan = smime_caps.choose(lists)
    assert (plan.cipher, plan.oaep) == (cipher, oaep)


def test_unknown_capability_names_are_refused() -> None:
    with pytest.raises(KeyStoreError, match="unknown S/MIME capabilities: aes-gcm"):
        smime_caps.parse_list("aes256-gcm,aes-gcm")
    assert smime_caps.parse_list(" AES256-GCM , aes256-cbc,aes256-gcm") == [
        "aes256-gcm", "aes256-cbc"]


def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "coffer.yaml"
    cfg.write_text("data_dir: data\nlisteners:\n  - name: inbound\n    tls: none\n")
    (tmp_path / "data").mkdir()
    return cfg


def test_cli_import_with_capabilities_and_show_prints_them(
        tmp_path: Path, identities: Identities, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path)
    cert = str(identities.smime["dave@smime.test"].cert_pem)
    try:
        assert main(["keys", "import", cert, "--config", str(cfg), "--json"]) == 0
        row = json.loads(capsys.readouterr().out)
        assert row["capabilities"] == []
        assert row["capabilities_source"].startswith("unknown: AES-256-CBC")

        assert main(["keys", "import", cert, "--capabilities", "aes256-gcm,aes256-cbc",
                     "--config", str(cfg)]) == 0
        capsys.readouterr()
        assert main(["keys", "show", "dave@smime.test", "--config", str(cfg)]) == 0
        out = capsys.readouterr().out
        assert "capabilities         aes256-gcm, aes256-cbc" in out
        assert "set by the operator" in out

        assert main(["keys", "import", cert, "--capabilities", "aes-gcm",
                     "--config", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert "unknown S/MIME capabilities: aes-gcm" in err and "Traceback" not in err

        pgp = tmp_path / "bob.asc"
        pgp.write_bytes(identities.pgp["bob@partner.test"].public)
        assert main(["keys", "import", str(pgp), "--capabilities", "aes256-gcm",
                     "--config", str(cfg)]) == 1
        assert "not OpenPGP keys" in capsys.readouterr().err
        assert main(["keys", "show", "bob@partner.test", "--config", str(cfg)]) == 1
    finally:
        kill_agent(tmp_path / "data" / "keys" / "gnupg")


def test_removing_a_certificate_removes_its_capabilities(
        store: KeyStore, identities: Identities) -> None:
    dave = cert_id("dave@smime.test", identities)
    store.set_capabilities(dave, ["aes256-gcm"])
    store.remove(dave)
    assert store.capabilities(dave) is None
    assert not list(store.certs_dir.glob(f"{dave}*"))


def test_a_signing_time_in_the_future_is_not_accepted(
        store: KeyStore, identities: Identities) -> None:
    dave = cert_id("dave@smime.test", identities)
    future = datetime.now(UTC) + timedelta(days=2)
    assert store.learn_capabilities(dave, ["aes256-gcm"], future) == \
        "not recorded: signing time in the future"
    assert store.learn_capabilities(dave, ["aes256-gcm"], None) == \
        "not recorded: the signature has no signing time"
    assert store.capabilities(dave) is None
