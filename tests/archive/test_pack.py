"""The pack segment format (archive.pack): pure encode/decode, no files."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest

from archive.errors import BlobIntegrityError
from archive.keys import KeyRing
from archive.pack import (
    KEYTABLE_HEADER,
    RECORD_HEADER_LEN,
    FormatError,
    dead_entry,
    encode_ack,
    encode_segment_header,
    parse_acks,
    parse_key_table,
    parse_record_header,
    parse_segment_header,
    seal,
    unseal,
)


@pytest.fixture(scope="module")
def ring(tmp_path_factory: pytest.TempPathFactory) -> KeyRing:
    return KeyRing.open(tmp_path_factory.mktemp("keys"), create=True)


@pytest.fixture
def sealed(ring: KeyRing) -> Callable[[bytes], tuple[str, bytes, bytes]]:
    def seal_one(data: bytes) -> tuple[str, bytes, bytes]:
        sha = hashlib.sha256(data).hexdigest()
        s = seal(sha, data, ring.current)
        return sha, s.record, s.key_entry
    return seal_one


Sealer = Callable[[bytes], tuple[str, bytes, bytes]]


def test_a_sealed_record_opens_with_its_key_entry(sealed: Sealer, ring: KeyRing) -> None:
    sha, record, entry = sealed(b"compressed bytes")
    head = parse_record_header(record)
    assert (head.sha256, head.total) == (sha, len(record))
    table = parse_key_table(KEYTABLE_HEADER + entry)
    assert unseal(record, table.keys[head.dkid], ring) == b"compressed bytes"


def test_each_record_has_its_own_data_key_and_nonce(sealed: Sealer) -> None:
    _, r1, e1 = sealed(b"same")
    _, r2, e2 = sealed(b"same")
    assert r1 != r2 and e1[-48:] != e2[-48:]


def test_relabelled_record_fails_to_open(sealed: Sealer, ring: KeyRing) -> None:
    sha, record, entry = sealed(b"message A")
    other = hashlib.sha256(b"message B").digest()
    relabelled = record[:5] + other + record[37:]
    key = parse_key_table(KEYTABLE_HEADER + entry)
    head = parse_record_header(relabelled)
    assert head.sha256 != sha
    with pytest.raises(BlobIntegrityError, match="does not unwrap"):
        unseal(relabelled, key.keys[head.dkid], ring)


def test_key_entry_of_another_record_is_refused(sealed: Sealer, ring: KeyRing) -> None:
    _, record, _ = sealed(b"message A")
    _, _, entry_b = sealed(b"message B")
    (key,) = parse_key_table(KEYTABLE_HEADER + entry_b).keys.values()
    with pytest.raises(BlobIntegrityError, match="another record"):
        unseal(record, key, ring)


def test_flipped_ciphertext_bit_fails_authentication(sealed: Sealer, ring: KeyRing) -> None:
    _, record, entry = sealed(b"message")
    (key,) = parse_key_table(KEYTABLE_HEADER + entry).keys.values()
    bad = bytearray(record)
    bad[RECORD_HEADER_LEN + 2] ^= 1
    with pytest.raises(BlobIntegrityError, match="authentication failed"):
        unseal(bytes(bad), key, ring)


def test_record_header_rejects_bad_magic_and_short_input(sealed: Sealer) -> None:
    _, record, _ = sealed(b"x")
    with pytest.raises(FormatError, match="bad magic"):
        parse_record_header(b"XXXX" + record[4:])
    with pytest.raises(FormatError, match="too short"):
        parse_record_header(record[:10])


def test_key_table_torn_last_entry_is_counted_not_parsed(sealed: Sealer) -> None:
    _, _, e1 = sealed(b"one")
    _, _, e2 = sealed(b"two")
    table = parse_key_table(KEYTABLE_HEADER + e1 + e2[:7])
    assert len(table.keys) == 1 and table.torn == 7


def test_key_table_encode_drops_shredded_keys_and_keeps_dead_marks(sealed: Sealer) -> None:
    _, r1, e1 = sealed(b"one")
    _, r2, e2 = sealed(b"two")
    d1 = parse_record_header(r1).dkid
    table = parse_key_table(KEYTABLE_HEADER + e1 + e2 + dead_entry(d1))
    assert d1 in table.dead
    again = parse_key_table(table.encode({d1}))
    assert set(again.keys) == {parse_record_header(r2).dkid}
    assert set(again.dead) == {d1}


def test_key_table_garbage_entry_is_a_format_error() -> None:
    with pytest.raises(FormatError, match="malformed key table entry"):
        parse_key_table(KEYTABLE_HEADER + b"\x00\x03abc")
    with pytest.raises(FormatError, match="bad magic"):
        parse_key_table(b"nope!")


def test_segment_header_round_trips_the_superseded_names() -> None:
    head = encode_segment_header(["0000000000000001-aaaaaaaa", "0000000000000002-bbbbbbbb"])
    assert parse_segment_header(head + b"records...") == (
        ["0000000000000001-aaaaaaaa", "0000000000000002-bbbbbbbb"], len(head))
    assert parse_segment_header(encode_segment_header()) == ([], 7)
    assert parse_segment_header(head[:3]) is None  # still being written
    # A garbled count reads the records' bytes as names: damaged, never names to delete.
    garbled = bytearray(head + b"\x19" + b"\xc3RECORD-BYTES-not-a-name" + b"x" * 64)
    garbled[5:7] = b"\x00\x03"
    with pytest.raises(FormatError, match="not a segment"):
        parse_segment_header(bytes(garbled))
    with pytest.raises(FormatError):
        parse_segment_header(b"CFRRxxxxxx")


def test_ack_log_round_trips_and_ignores_a_torn_entry() -> None:
    data = encode_ack(7) + encode_ack(2**40)
    assert parse_acks(data + data[:5]) == [7, 2**40]
