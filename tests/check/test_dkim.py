"""DKIM: verification of corpus vectors, signing, and round trips with OpenDKIM.

Keys are published in the loopback DNS server; nothing leaves the machine.  The
OpenDKIM round trips use Debian's ``opendkim`` in its test mode (``-t``): it signs
as a milter would (printing the header it would insert), and verifies with its
libunbound resolver forwarded to our loopback server.  (``opendkim-testmsg``
cannot be used: it has no way to name a nameserver, uses the system resolver
on port 53, and signs only with rsa-sha1.)
"""

from __future__ import annotations

import base64
import email
import email.policy
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest
from authdns import DnsTestServer, Zone
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.check import dkim_verify
from gateway.check.dns import Resolver
from gateway.transform.dkim_sign import (
    DkimSignError,
    generate_key,
    headers_to_sign,
    public_record,
    sign,
)

MSG = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: quarterly figures\r\n"
    b"Date: Fri, 27 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <q4@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Revenue is up \xe2\x80\x94 details attached.\r\n"
)


@pytest.fixture(scope="module")
def rsa_key() -> bytes:
    return generate_key("rsa-sha256")


@pytest.fixture(scope="module")
def ed_key() -> bytes:
    return generate_key("ed25519-sha256")


def publish(zone: Zone, domain: str, selector: str, key: bytes) -> None:
    zone.txt(f"{selector}._domainkey.{domain}", public_record(key))


# --- corpus vectors ----------------------------------------------------------


def _rfc8463_zone(zone: Zone, corpus: Path) -> None:
    # RFC 8463 §A.2: the Ed25519 key is RFC 8032 §7.1 test 1; its seed is in the corpus
    seed = base64.b64decode((corpus / "dkim-arc/dkimpy/rfc8032_7_1.key").read_bytes().strip())
    pub = ed25519.Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    zone.txt("brisbane._domainkey.football.example.com",
             f"v=DKIM1; k=ed25519; p={base64.b64encode(pub).decode()}")
    # RFC 8463 §A.2: the RSA key, as dkimpy ships it
    zone.txt("test._domainkey.football.example.com",
             (corpus / "dkim-arc/dkimpy/test.txt").read_text().strip())


@pytest.mark.parametrize("path", ["mimekit-dkim/rfc8463-example.msg",
                                  "dkimpy/rfc6376.signed.msg"])
def test_rfc8463_examples_verify_both_signatures(zone: Zone, resolver: Resolver, corpus: Path,
                                                 path: str) -> None:
    _rfc8463_zone(zone, corpus)
    data = (corpus / "dkim-arc" / path).read_bytes()
    verdicts = dkim_verify.verify_sync(resolver, data)
    assert [(v.result, v.algorithm, v.selector) for v in verdicts] == [
        ("pass", "ed25519-sha256", "brisbane"), ("pass", "rsa-sha256", "test")]
    assert all(v.domain == "football.example.com" for v in verdicts)


def test_rfc6376_rsa_only_example_verifies(zone: Zone, resolver: Resolver, corpus: Path) -> None:
    _rfc8463_zone(zone, corpus)
    data = (corpus / "dkim-arc/dkimpy/rfc6376.signed.rsa.msg").read_bytes()
    assert [v.result for v in dkim_verify.verify_sync(resolver, data)] == ["pass"]


def test_real_gmail_signature_verifies(zone: Zone, resolver: Resolver, corpus: Path) -> None:
    pem = (corpus / "dkim-arc/mimekit-dkim/gmail.pub").read_bytes()
    der = serialization.load_pem_public_key(pem).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    zone.txt("20120113._domainkey.gmail.com",
             f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}")
    data = (corpus / "dkim-arc/mimekit-dkim/gmail.msg").read_bytes()
    (v,) = dkim_verify.verify_sync(resolver, data)
    assert (v.result, v.domain, v.selector) == ("pass", "gmail.com", "20120113")


def test_corpus_message_with_altered_body_fails(zone: Zone, resolver: Resolver,
                                                corpus: Path) -> None:
    _rfc8463_zone(zone, corpus)
    data = (corpus / "dkim-arc/mimekit-dkim/rfc8463-example.msg").read_bytes()
    data = data.replace(b"We lost the game.", b"We won the game.")
    verdicts = dkim_verify.verify_sync(resolver, data)
    assert [v.result for v in verdicts] == ["fail", "fail"]
    assert all("body hash" in v.reason for v in verdicts)


# --- verification outcomes -----------------------------------------------------


def test_every_signature_gets_its_own_verdict(zone: Zone, resolver: Resolver, rsa_key: bytes,
                                              ed_key: bytes) -> None:
    publish(zone, "example.com", "good", rsa_key)
    publish(zone, "example.net", "other", ed_key)
    signed = sign(sign(MSG, "example.com", "good", rsa_key), "example.net", "missing", ed_key)
    verdicts = dkim_verify.verify_sync(resolver, signed)
    assert [(v.result, v.domain) for v in verdicts] == [
        ("permerror", "example.net"), ("pass", "example.com")]
    assert "no key" in verdicts[0].reason


def test_key_lookup_timeout_is_temperror(zone: Zone, resolver: Resolver, rsa_key: bytes) -> None:
    zone.timeout("slow._domainkey.example.com")
    (v,) = dkim_verify.verify_sync(resolver, sign(MSG, "example.com", "slow", rsa_key))
    assert v.result == "temperror"


def test_key_lookup_servfail_is_temperror(zone: Zone, resolver: Resolver,
                                          rsa_key: bytes) -> None:
    zone.fail("broken._domainkey.example.com")
    (v,) = dkim_verify.verify_sync(resolver, sign(MSG, "example.com", "broken", rsa_key))
    assert v.result == "temperror"


def test_garbage_key_record_is_permerror(zone: Zone, resolver: Resolver, rsa_key: bytes) -> None:
    zone.txt("bad._domainkey.example.com", "v=DKIM1; k=rsa; p=bm90IGEga2V5")
    (v,) = dkim_verify.verify_sync(resolver, sign(MSG, "example.com", "bad", rsa_key))
    assert v.result == "permerror"


def test_key_shorter_than_the_minimum_is_permerror(zone: Zone, resolver: Resolver,
                                                   corpus: Path) -> None:
    _rfc8463_zone(zone, corpus)  # its RSA key has 1024 bits
    data = (corpus / "dkim-arc/dkimpy/rfc6376.signed.rsa.msg").read_bytes()
    (v,) = dkim_verify.verify_sync(resolver, data, min_key_bits=2048)
    assert v.result == "permerror" and "too small" in v.reason


def test_rsa_sha1_signature_is_refused_by_policy(zone: Zone, resolver: Resolver,
                                                 rsa_key: bytes) -> None:
    # RFC 8301 §3.1
    publish(zone, "example.com", "old", rsa_key)
    from gateway.transform.dkim_sign import dkimpy_key

    _, pk = dkimpy_key(rsa_key)
    header = dkim.sign(MSG, b"old", b"example.com", pk, signature_algorithm=b"rsa-sha1")
    (v,) = dkim_verify.verify_sync(resolver, header + MSG)
    assert v.result == "policy"


def test_signature_with_l_reports_the_unsigned_bytes(zone: Zone, resolver: Resolver,
                                                     rsa_key: bytes) -> None:
    publish(zone, "example.com", "len", rsa_key)
    from gateway.transform.dkim_sign import dkimpy_key

    _, pk = dkimpy_key(rsa_key)
    header = dkim.sign(MSG, b"len", b"example.com", pk, length=True)
    appended = header + MSG + b"Click here: http://evil.example/\r\n"
    (v,) = dkim_verify.verify_sync(resolver, appended)
    assert v.result == "pass"
    assert v.unsigned_bytes == len(b"Click here: http://evil.example/\r\n")
    (untouched,) = dkim_verify.verify_sync(resolver, header + MSG)
    assert untouched.unsigned_bytes == 0


def test_no_signature_gives_no_verdicts(resolver: Resolver) -> None:
    assert dkim_verify.verify_sync(resolver, MSG) == ()


# --- signing -----------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
def test_coffer_signature_verifies(zone: Zone, resolver: Resolver, rsa_key: bytes,
                                   ed_key: bytes, algorithm: str) -> None:
    key = rsa_key if algorithm == "rsa-sha256" else ed_key
    publish(zone, "example.com", "s1", key)
    (v,) = dkim_verify.verify_sync(resolver, sign(MSG, "example.com", "s1", key))
    assert (v.result, v.algorithm, v.unsigned_bytes) == ("pass", algorithm, 0)


def test_signature_has_no_l_tag_and_oversigns_from(rsa_key: bytes) -> None:
    signed = sign(MSG, "example.com", "s1", rsa_key)
    header = signed.split(b"\r\nFrom:", 1)[0]
    assert not re.search(rb"[;\s]l=", header)
    h = re.search(rb"h=([^;]+);", header.replace(b"\r\n", b""))
    assert h is not None
    names = [n.strip().lower() for n in h.group(1).split(b":")]
    assert names.count(b"from") == 2  # one From present, signed twice
    assert headers_to_sign(MSG).count(b"from") == 2


def test_added_from_breaks_the_oversigned_signature(zone: Zone, resolver: Resolver,
                                                    rsa_key: bytes) -> None:
    publish(zone, "example.com", "s1", rsa_key)
    signed = sign(MSG, "example.com", "s1", rsa_key)
    forged = signed.replace(b"From: Alice", b"From: CEO <ceo@example.com>\r\nFrom: Alice", 1)
    (v,) = dkim_verify.verify_sync(resolver, forged)
    assert v.result == "fail"


def test_dkimpy_raw_ed25519_seed_is_accepted(zone: Zone, resolver: Resolver,
                                             corpus: Path) -> None:
    key = (corpus / "dkim-arc/dkimpy/ed25519test.key").read_bytes()
    publish(zone, "example.com", "raw", key)
    (v,) = dkim_verify.verify_sync(resolver, sign(MSG, "example.com", "raw", key))
    assert v.result == "pass"


def test_signing_refuses_a_message_without_from(rsa_key: bytes) -> None:
    with pytest.raises(DkimSignError, match="no From"):
        sign(MSG.replace(b"From: Alice <alice@example.com>\r\n", b""), "example.com", "s",
             rsa_key)


def test_signing_refuses_a_bad_key() -> None:
    with pytest.raises(DkimSignError):
        sign(MSG, "example.com", "s",
             b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")


def _reencode_qp(data: bytes) -> bytes:
    """What a transform stage might do: 8bit body -> quoted-printable."""
    msg = email.message_from_bytes(data, policy=email.policy.SMTP)
    body = msg.get_content()
    del msg["Content-Transfer-Encoding"]
    msg.set_content(body, cte="quoted-printable")
    return msg.as_bytes()


def test_body_reencoded_by_the_gateway_then_signed_verifies_downstream(
        zone: Zone, resolver: Resolver, rsa_key: bytes) -> None:
    publish(zone, "example.com", "s1", rsa_key)
    reencoded = _reencode_qp(MSG)
    assert reencoded.split(b"\r\n\r\n", 1)[1] != MSG.split(b"\r\n\r\n", 1)[1]
    (v,) = dkim_verify.verify_sync(resolver, sign(reencoded, "example.com", "s1", rsa_key))
    assert v.result == "pass"
    # and why signing must come last: re-encoding a signed message breaks it
    (broken,) = dkim_verify.verify_sync(resolver,
                                        _reencode_qp(sign(MSG, "example.com", "s1", rsa_key)))
    assert broken.result == "fail"


# --- OpenDKIM round trips ----------------------------------------------------


@pytest.fixture
def opendkim_dir() -> Iterator[Path]:
    """A private directory for opendkim's files: it refuses a config or key file
    with a world-writable ancestor (so not under /tmp)."""
    if shutil.which("opendkim") is None:
        pytest.skip("opendkim not installed (Debian package opendkim)")
    base = Path.home()
    if base.stat().st_mode & 0o022:
        pytest.skip(f"{base} is group/world-writable: opendkim refuses config files under it")
    with tempfile.TemporaryDirectory(dir=base, prefix="coffer-opendkim-") as d:
        Path(d).chmod(0o700)
        yield Path(d)


def _opendkim(workdir: Path, conf: str, message: bytes) -> str:
    # as root, opendkim would switch to its own user, which cannot read our files
    user = "UserID root\n" if os.geteuid() == 0 else ""
    (workdir / "opendkim.conf").write_text(conf + "Syslog no\n" + user)
    (workdir / "msg.eml").write_bytes(message)
    proc = subprocess.run(
        ["opendkim", "-x", str(workdir / "opendkim.conf"), "-t", str(workdir / "msg.eml"),
         "-vv"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def _verify_conf(workdir: Path, dns: DnsTestServer) -> str:
    # libunbound, told to forward everything to the loopback server
    (workdir / "unbound.conf").write_text(
        "server:\n  do-not-query-localhost: no\n  module-config: \"iterator\"\n"
        f"forward-zone:\n  name: \".\"\n  forward-addr: 127.0.0.1@{dns.port}\n")
    return (f"Mode v\nAlwaysAddARHeader yes\nAuthservID opendkim.test\n"
            f"ResolverConfiguration {workdir / 'unbound.conf'}\n")


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
def test_opendkim_verifies_coffer_signature(opendkim_dir: Path, dns_server: DnsTestServer,
                                            rsa_key: bytes, ed_key: bytes,
                                            algorithm: str) -> None:
    key = rsa_key if algorithm == "rsa-sha256" else ed_key
    publish(dns_server.zone, "example.com", "coffer", key)
    out = _opendkim(opendkim_dir, _verify_conf(opendkim_dir, dns_server),
                    sign(MSG, "example.com", "coffer", key))
    assert re.search(rf"dkim=pass .*header\.a={algorithm} header\.s=coffer", out), out


def test_opendkim_rejects_tampered_coffer_signature(opendkim_dir: Path,
                                                    dns_server: DnsTestServer,
                                                    ed_key: bytes) -> None:
    publish(dns_server.zone, "example.com", "coffer", ed_key)
    signed = sign(MSG, "example.com", "coffer", ed_key).replace(b"Revenue is up",
                                                                b"Revenue is down")
    out = _opendkim(opendkim_dir, _verify_conf(opendkim_dir, dns_server), signed)
    assert "dkim=fail" in out, out


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
def test_coffer_verifies_opendkim_signature(opendkim_dir: Path, zone: Zone, resolver: Resolver,
                                            rsa_key: bytes, ed_key: bytes,
                                            algorithm: str) -> None:
    key = rsa_key if algorithm == "rsa-sha256" else ed_key
    (opendkim_dir / "key.pem").write_bytes(key)
    (opendkim_dir / "key.pem").chmod(0o600)
    out = _opendkim(opendkim_dir, (
        f"Mode s\nDomain example.com\nSelector odk\nKeyFile {opendkim_dir / 'key.pem'}\n"
        f"SignatureAlgorithm {algorithm}\nCanonicalization relaxed/relaxed\n"), MSG)
    m = re.search(r"### INSHEADER: idx=0 hname='DKIM-Signature' hvalue='([^']*)'", out)
    assert m, out
    header = b"DKIM-Signature: " + m.group(1).replace("\n", "\r\n").encode() + b"\r\n"
    publish(zone, "example.com", "odk", key)
    (v,) = dkim_verify.verify_sync(resolver, header + MSG)
    assert (v.result, v.algorithm, v.selector) == ("pass", algorithm, "odk")
    (bad,) = dkim_verify.verify_sync(resolver, header + MSG.replace(b"Revenue", b"Losses"))
    assert bad.result == "fail"
