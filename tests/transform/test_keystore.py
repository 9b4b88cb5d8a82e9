"""The key store and ``coffer keys``: import, lookup by recipient, unusable keys reported."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptokit import P12_PASS, Identities, _pgp_identity, crypto_config, kill_agent

from gateway.cli import main
from gateway.transform.errors import KeyStoreError
from gateway.transform.keystore import KeyStore


def test_expired_and_revoked_keys_are_listed_with_their_status_and_never_looked_up(
        store: KeyStore, identities: Identities) -> None:
    status = {(k.kind, a): k.status for k in store.list_keys() for a in k.addresses}
    assert status[("pgp", "bob@partner.test")] == "ok"
    assert status[("pgp", "expired@partner.test")] == "expired"
    assert status[("pgp", "revoked@partner.test")] == "revoked"
    assert status[("x509", "old@smime.test")] == "expired"
    assert status[("x509", "frank@smime.test")] == "revoked"  # by the CA's CRL
    assert status[("x509", "dave@smime.test")] == "ok"
    for addr in ("expired@partner.test", "revoked@partner.test", "old@smime.test",
                 "frank@smime.test"):
        found = store.lookup(addr)
        assert found.pgp == [] and found.smime == []
        assert found.unusable, addr
    assert store.lookup("bob@partner.test").pgp == [identities.pgp["bob@partner.test"].fingerprint]
    assert store.lookup("BOB@partner.test").pgp  # addresses compare case-insensitively


def test_domain_binding_serves_every_address_of_the_domain(
        store: KeyStore, identities: Identities) -> None:
    bob = identities.pgp["bob@partner.test"]
    assert store.lookup("anyone@gateway.test").pgp == []
    store.import_bytes(bob.public, bind="gateway.test")
    assert store.lookup("anyone@gateway.test").pgp == [bob.fingerprint]
    # An address's own key wins over the domain's.
    assert store.lookup("carol@partner.test").pgp == [
        identities.pgp["carol@partner.test"].fingerprint]


def test_pkcs12_private_key_is_stored_encrypted_and_private(store: KeyStore) -> None:
    (p,) = list(store.private_dir.glob("*.pem"))
    assert p.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    ids = store.smime_identities()
    assert [i.cert.subject.rfc4514_string() for i in ids] == [
        "1.2.840.113549.1.9.1=signer@corp.test,CN=signer@corp.test"]


def test_group_readable_private_key_refuses_to_start(data_dir: Path) -> None:
    (p,) = list((data_dir / "keys" / "private").glob("*.pem"))
    p.chmod(0o640)
    with pytest.raises(KeyStoreError, match="readable by group or others"):
        KeyStore.open(data_dir, crypto_config(data_dir))


def test_world_readable_passphrase_file_refuses_to_start(data_dir: Path) -> None:
    (data_dir / "passphrase").chmod(0o644)
    with pytest.raises(KeyStoreError, match="passphrase file is readable"):
        KeyStore.open(data_dir, crypto_config(data_dir))


def test_wrong_pkcs12_password_is_a_clear_error(store: KeyStore, identities: Identities) -> None:
    assert identities.org_p12 is not None
    with pytest.raises(KeyStoreError, match="wrong password"):
        store.import_file(identities.org_p12, password=b"nope" + P12_PASS)


def test_garbage_file_is_refused_naming_it(store: KeyStore, tmp_path: Path) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(KeyStoreError, match=r"notes\.txt"):
        store.import_file(f)


def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "coffer.yaml"
    cfg.write_text("data_dir: data\nlisteners:\n  - name: inbound\n    tls: none\n")
    (tmp_path / "data").mkdir()
    return cfg


def test_cli_import_list_show_remove_json(tmp_path: Path, identities: Identities,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path)
    bob = identities.pgp["bob@partner.test"]
    expired = identities.pgp["expired@partner.test"]
    (tmp_path / "bob.asc").write_bytes(bob.public)
    (tmp_path / "old.asc").write_bytes(expired.public)
    try:
        assert main(["keys", "import", str(tmp_path / "bob.asc"), "--config", str(cfg),
                     "--json"]) == 0
        imported = json.loads(capsys.readouterr().out)
        assert imported["id"] == bob.fingerprint and imported["status"] == "ok"

        # Every key imported is unusable: exit 1 and a warning naming it.
        assert main(["keys", "import", str(tmp_path / "old.asc"), "--config", str(cfg)]) == 1
        assert "not usable: expired" in capsys.readouterr().err

        assert main(["keys", "import", str(identities.smime["dave@smime.test"].cert_pem),
                     "--for", "smime.test", "--config", str(cfg), "--json"]) == 0
        capsys.readouterr()

        assert main(["keys", "list", "--config", str(cfg), "--json"]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert {(r["kind"], r["status"]) for r in rows} == {
            ("pgp", "ok"), ("pgp", "expired"), ("x509", "ok")}
        x509_row = next(r for r in rows if r["kind"] == "x509")
        assert x509_row["bound_to"] == ["smime.test"]

        assert main(["keys", "show", "bob@partner.test", "--config", str(cfg), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["id"] == bob.fingerprint

        assert main(["keys", "remove", bob.fingerprint, "--config", str(cfg)]) == 0
        assert main(["keys", "show", "bob@partner.test", "--config", str(cfg)]) == 1
        assert "no key matches" in capsys.readouterr().err
    finally:
        kill_agent(tmp_path / "data" / "keys" / "gnupg")


def test_cli_refuses_unsafe_private_keys_with_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path)
    priv = tmp_path / "data" / "keys" / "private"
    priv.mkdir(parents=True, mode=0o700)
    (priv / "x.pem").write_text("key")
    (priv / "x.pem").chmod(0o644)
    assert main(["keys", "list", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "readable by group or others" in err and "Traceback" not in err


def test_unprotected_secret_key_is_refused(store: KeyStore, identities: Identities) -> None:
    bob = identities.pgp["bob@partner.test"]  # made without a passphrase
    with pytest.raises(KeyStoreError, match="not passphrase-protected"):
        store.import_bytes(bob.secret)
    assert not [k for k in store.list_keys() if k.private and bob.fingerprint == k.id]


def test_secret_key_with_another_passphrase_is_refused_and_not_kept(
        store: KeyStore, identities: Identities) -> None:
    other = _pgp_identity(identities, "Other", "other@corp.test", passphrase="not-ours")
    with pytest.raises(KeyStoreError, match="does not open"):
        store.import_bytes(other.secret)
    assert other.fingerprint not in {k.id for k in store.list_keys()}


def test_crl_without_its_issuer_in_the_store_is_refused(
        tmp_path: Path, identities: Identities) -> None:
    assert identities.crl is not None
    data = tmp_path / "d"
    data.mkdir()
    store = KeyStore.open(data, crypto_config(data).model_copy(update={"passphrase_file": None}))
    try:
        with pytest.raises(KeyStoreError, match="import the issuing CA certificate first"):
            store.import_file(identities.crl)
    finally:
        store.close()


def test_crypto_config_reads_durations_and_rejects_unknown_keys() -> None:
    from pydantic import ValidationError

    from gateway.transform.config import CryptoConfig
    assert CryptoConfig.model_validate({"timeout": "2m"}).timeout == 120.0
    with pytest.raises(ValidationError, match="extra"):
        CryptoConfig.model_validate({"encrypt_everything": True})
