"""Pure MIME structure: detection by parsing (never substrings), exact part bytes."""

from __future__ import annotations

from cryptokit import Identities

from gateway.transform import mime, smime, smime_caps

ARMOR = b"-----BEGIN PGP MESSAGE-----\r\n\r\nhQEMA...\r\n-----END PGP MESSAGE-----\r\n"


def test_quoted_armour_in_a_plain_text_reply_is_not_encrypted() -> None:
    # lacre/zeyple's mistake: substring detection lets such a reply go out in clear
    # forever, or skips encrypting a message that merely quotes one.
    data = b"Content-Type: text/plain\r\n\r\n> you sent:\r\n" + ARMOR
    assert mime.encryption_of(data) is None


def test_pgp_mime_is_recognised_by_its_content_type_and_protocol() -> None:
    data = mime.pgp_encrypted([b"To: a@b.test\r\n"], ARMOR)
    assert mime.encryption_of(data) == "pgp"
    assert mime.pgp_ciphertext(data) == ARMOR
    other = data.replace(b'protocol="application/pgp-encrypted"', b'protocol="x/other"')
    assert mime.encryption_of(other) is None


def test_smime_types_signed_data_is_not_encrypted_enveloped_is() -> None:
    signed = b"Content-Type: application/pkcs7-mime; smime-type=signed-data\r\n\r\nMIIB\r\n"
    env = b'Content-Type: application/x-pkcs7-mime; smime-type="enveloped-data"\r\n\r\nMIIB\r\n'
    auth = b"Content-Type: application/pkcs7-mime; smime-type=authEnveloped-data\r\n\r\nMI\r\n"
    assert mime.encryption_of(signed) is None and mime.signature_of(signed) == "smime"
    assert mime.encryption_of(env) == "smime" and mime.encryption_of(auth) == "smime"


def test_missing_smime_type_is_decided_by_the_cms_content_type(identities: Identities) -> None:
    dave = identities.smime["dave@smime.test"]
    der = smime.encrypt(b"\r\nhi\r\n", [dave.cert], smime_caps.choose([None]))
    assert mime.cms_content_type(der) == mime.ENVELOPED_DATA
    data = mime.smime_enveloped([], der).replace(b" smime-type=enveloped-data;", b"")
    assert b"smime-type" not in data
    assert mime.encryption_of(data) == "smime"
    sig = smime.sign(b"\r\nhi\r\n", dave.cert, dave.key, detached=False)
    assert mime.cms_content_type(sig) == mime.SIGNED_DATA
    assert mime.encryption_of(mime.smime_enveloped([], sig).replace(
        b" smime-type=enveloped-data;", b"")) is None


def test_protect_moves_content_fields_with_their_folded_lines() -> None:
    data = (b"From: a@b.test\r\nContent-Type: multipart/mixed;\r\n\tboundary=x\r\n"
            b"Subject: s\r\nMIME-Version: 1.0\r\n\r\n--x\r\n\r\nbody\r\n--x--\r\n")
    s = mime.protect(data)
    assert s.outer == [b"From: a@b.test\r\n", b"Subject: s\r\n"]
    assert s.entity == (b"Content-Type: multipart/mixed;\r\n\tboundary=x\r\n\r\n"
                        b"--x\r\n\r\nbody\r\n--x--\r\n")
    assert mime.unwrap(mime.pgp_encrypted(s.outer, ARMOR), s.entity) == (
        b"From: a@b.test\r\nSubject: s\r\nMIME-Version: 1.0\r\n" + s.entity)


def test_raw_parts_are_exact_and_ignore_lookalike_boundaries() -> None:
    part1 = b"Content-Type: text/plain\r\n\r\n--bnd-not-a-delimiter\r\ntrailing space \r\n"
    part2 = b"Content-Type: application/pgp-signature\r\n\r\nSIG\r\n"
    data = (b'Content-Type: multipart/signed; boundary="bnd"; protocol="application/'
            b'pgp-signature"\r\n\r\npreamble\r\n--bnd\r\n' + part1 + b"\r\n--bnd \r\n"
            + part2 + b"\r\n--bnd--\r\nepilogue\r\n")
    assert mime.raw_parts(data) == [part1, part2]
    assert mime.signed_parts(data) == (part1, b"SIG\r\n")


def test_generated_boundary_never_occurs_in_the_content() -> None:
    entity = b"Content-Type: text/plain\r\n\r\n--=_coffer_\r\n"
    msg = mime.pgp_signed([], entity, b"SIG", "pgp-sha256")
    _, params = mime.content_type(msg)
    assert params["boundary"].encode() not in entity
    assert mime.signed_parts(msg)[0] == entity


def test_lf_only_input_is_canonicalised_to_crlf() -> None:
    assert mime.crlf(b"a\nb\r\nc\rd") == b"a\r\nb\r\nc\r\nd"
