"""DANE matching (RFC 7672 §3, RFC 6698), as pure logic: TLSA records and a certificate
chain made by the real openssl in, a verdict out."""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from danepeers import Served, cert_sha256, der, from_ca, issued_by, self_signed, spki_sha256
from stspeers import StsCa, make_ca

from gateway.deliver.dane import (
    HostPolicy,
    Tlsa,
    TlsaAnswer,
    host_policy,
    tlsa_name,
    usable,
    verify,
)

MX = "mx1.dst.test"


@dataclass(frozen=True)
class Pki:
    ca: StsCa
    other_ca: StsCa
    selfsigned: Served  # a self-signed leaf named wrong.test
    good: Served  # CA-signed leaf for MX, sent with the CA
    wrong_name: Served  # CA-signed leaf for another name, sent with the CA
    wildcard: Served  # CA-signed leaf for *.dst.test
    foreign: Served  # a leaf for MX from another CA, sent with that CA
    forged: Served  # a leaf for MX signed by wrong_name's (non-CA) key, with its chain


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    tmp = tmp_path_factory.mktemp("dane-pki")
    ca, other = make_ca(tmp / "ca"), make_ca(tmp / "other")
    wrong_name = from_ca(ca, "elsewhere.test")
    return Pki(ca, other, self_signed(tmp / "ss", "wrong.test"), from_ca(ca, MX),
               wrong_name, from_ca(ca, "*.dst.test"), from_ca(other, MX),
               issued_by(wrong_name, tmp / "forged", MX))


def _spki_full(pem: Path) -> bytes:
    return x509.load_pem_x509_certificate(pem.read_bytes()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


# (case, records(pki), served(pki), expected: None = authenticated, else a word of the reason)
CASES = [
    ("3 1 1 on a self-signed leaf, whatever its name",
     lambda p: [Tlsa(3, 1, 1, spki_sha256(p.selfsigned.leaf))], "selfsigned", None),
    ("3 0 1 full certificate digest",
     lambda p: [Tlsa(3, 0, 1, cert_sha256(p.selfsigned.leaf))], "selfsigned", None),
    ("3 0 2 SHA-512",
     lambda p: [Tlsa(3, 0, 2, hashlib.sha512(der(p.selfsigned.leaf)).digest())],
     "selfsigned", None),
    ("3 1 0 the SPKI itself",
     lambda p: [Tlsa(3, 1, 0, _spki_full(p.selfsigned.leaf))], "selfsigned", None),
    ("3 1 1 of another key",
     lambda p: [Tlsa(3, 1, 1, spki_sha256(p.good.leaf))], "selfsigned", "DANE-EE"),
    ("one matching record among others is enough",
     lambda p: [Tlsa(3, 1, 1, b"\0" * 32), Tlsa(3, 1, 1, spki_sha256(p.selfsigned.leaf))],
     "selfsigned", None),
    ("2 0 1 on the CA, leaf named for the MX host",
     lambda p: [Tlsa(2, 0, 1, cert_sha256(p.ca.ca_pem))], "good", None),
    ("2 1 1 on the CA's key",
     lambda p: [Tlsa(2, 1, 1, spki_sha256(p.ca.ca_pem))], "good", None),
    ("2 0 1 on the CA, wildcard leaf covers the MX host",
     lambda p: [Tlsa(2, 0, 1, cert_sha256(p.ca.ca_pem))], "wildcard", None),
    ("2 0 1 on the CA, leaf named for another host",
     lambda p: [Tlsa(2, 0, 1, cert_sha256(p.ca.ca_pem))], "wrong_name", "not valid for"),
    ("2 0 1 on another CA than the one the chain has",
     lambda p: [Tlsa(2, 0, 1, cert_sha256(p.other_ca.ca_pem))], "good", "no certificate"),
    ("a chain whose CA matches but whose leaf another CA signed",
     lambda p: [Tlsa(2, 0, 1, cert_sha256(p.ca.ca_pem))], "spliced", "chain broken"),
    ("a leaf certificate under the anchor cannot issue one for the MX host",
     lambda p: [Tlsa(2, 0, 1, cert_sha256(p.ca.ca_pem))], "forged", "not a CA"),
    ("2 1 0 the CA's public key, the CA's certificate not sent",
     lambda p: [Tlsa(2, 1, 0, _spki_full(p.ca.ca_pem))], "good_leaf_only", None),
    ("2 1 0 the CA's public key, the CA's certificate sent",
     lambda p: [Tlsa(2, 1, 0, _spki_full(p.ca.ca_pem))], "good", None),
    ("2 1 0 another CA's key does not anchor the chain",
     lambda p: [Tlsa(2, 1, 0, _spki_full(p.other_ca.ca_pem))], "good_leaf_only",
     "no certificate"),
    ("2 1 0 the CA's key, leaf named for another host",
     lambda p: [Tlsa(2, 1, 0, _spki_full(p.ca.ca_pem))], "wrong_name_leaf_only",
     "not valid for"),
    ("2 1 0 the CA's key above a leaf that issued the MX host's certificate",
     lambda p: [Tlsa(2, 1, 0, _spki_full(p.ca.ca_pem))], "forged_without_ca", "not a CA"),
    ("2 1 0 a self-signed leaf's own key is no trust anchor",
     lambda p: [Tlsa(2, 1, 0, _spki_full(p.selfsigned.leaf))], "selfsigned",
     "no certificate"),
    ("2 1 0 not a public key at all",
     lambda p: [Tlsa(2, 1, 0, b"not a key")], "good_leaf_only", "no certificate"),
    ("2 x x never matches the leaf itself",
     lambda p: [Tlsa(2, 0, 1, cert_sha256(p.selfsigned.leaf))], "selfsigned", "no certificate"),
]


@pytest.mark.parametrize(("case", "records", "served", "expected"), CASES,
                         ids=[c[0] for c in CASES])
def test_verify(pki: Pki, case: str, records: Callable[[Pki], list[Tlsa]], served: str,
                expected: str | None) -> None:
    if served == "spliced":  # the foreign leaf presented with our CA behind it
        chain = [der(pki.foreign.leaf), der(pki.ca.ca_pem)]
    elif served.endswith("_leaf_only"):  # the server does not send its CA
        chain = [der(getattr(pki, served.removesuffix("_leaf_only")).leaf)]
    elif served == "forged_without_ca":
        chain = pki.forged.ders()[:-1]
    else:
        chain = getattr(pki, served).ders()
    why = verify(records(pki), chain, [MX])
    if expected is None:
        assert why is None
    else:
        assert why is not None and expected in why


@pytest.mark.parametrize(("days", "expected"), [(30, "expired on"), (-30, "is not yet valid")],
                         ids=["expired", "not-yet-valid"])
def test_dane_ta_leaf_out_of_its_validity_period_fails_saying_which_way(
    pki: Pki, days: int, expected: str,
) -> None:
    then = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=days)
    why = verify([Tlsa(2, 0, 1, cert_sha256(pki.ca.ca_pem))], pki.good.ders(), [MX], now=then)
    assert why is not None and why.startswith(f"certificate at depth 0 {expected}")


def test_dane_ee_ignores_the_validity_period(pki: Pki) -> None:
    # RFC 7672 §3.1.1: the TLSA record, not the certificate's dates, is the authority.
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3650)
    assert verify([Tlsa(3, 1, 1, spki_sha256(pki.selfsigned.leaf))],
                  pki.selfsigned.ders(), [MX], now=later) is None


def test_no_certificate_is_never_authenticated() -> None:
    assert verify([Tlsa(3, 1, 1, b"\0" * 32)], [], [MX]) == "the server sent no certificate"


@pytest.mark.parametrize(("record", "kept"), [
    (Tlsa(3, 1, 1, b"\1" * 32), True),
    (Tlsa(2, 0, 2, b"\1" * 64), True),
    (Tlsa(3, 0, 0, b"\1" * 300), True),
    (Tlsa(1, 1, 1, b"\1" * 32), False),  # PKIX-EE: not for SMTP (RFC 7672 §3.1.3)
    (Tlsa(0, 0, 1, b"\1" * 32), False),  # PKIX-TA: likewise
    (Tlsa(4, 1, 1, b"\1" * 32), False),  # unknown usage
    (Tlsa(3, 2, 1, b"\1" * 32), False),  # unknown selector
    (Tlsa(3, 1, 3, b"\1" * 32), False),  # unknown matching type
    (Tlsa(3, 1, 1, b"\1" * 31), False),  # a SHA-256 of the wrong length
])
def test_usable_keeps_dane_ta_and_dane_ee_records_only(record: Tlsa, kept: bool) -> None:
    assert usable([record]) == ((record,) if kept else ())


@pytest.mark.parametrize(("answer", "expected"), [
    (TlsaAnswer((), secure=True), None),  # no records: not a DANE host
    (TlsaAnswer((Tlsa(3, 1, 1, b"\1" * 32),), secure=False), None),  # insecure: ignored
    (TlsaAnswer((Tlsa(3, 1, 1, b"\1" * 32), Tlsa(1, 1, 1, b"\2" * 32)), secure=True),
     HostPolicy("dane", (Tlsa(3, 1, 1, b"\1" * 32),),
                published=(Tlsa(3, 1, 1, b"\1" * 32), Tlsa(1, 1, 1, b"\2" * 32)))),
    # RFC 7672 §2.2: present but unusable -> TLS required, no authentication.
    (TlsaAnswer((Tlsa(1, 1, 1, b"\2" * 32),), secure=True),
     HostPolicy("encrypt", (), published=(Tlsa(1, 1, 1, b"\2" * 32),))),
])
def test_host_policy_follows_rfc7672_section_2_2(
    answer: TlsaAnswer, expected: HostPolicy | None
) -> None:
    assert host_policy(answer) == expected


def test_tlsa_name_is_port_and_protocol_under_the_mx_host() -> None:
    assert tlsa_name("mx1.dst.test.", 25) == "_25._tcp.mx1.dst.test"
