"""Local delivery into a Maildir: spec layout, exact bytes, no escape from the root."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gateway.config import Config
from gateway.deliver.deliverer import Deliverer
from gateway.envelope import Envelope
from gateway.queue.state import RcptStatus

# 8-bit, a dot line and bare-looking content: all must arrive byte for byte.
MSG = (b"From: a@src.test\r\nTo: Bob@local.test\r\nSubject: caf\xc3\xa9\r\n\r\n"
       b"line one\r\n.\r\n..dots\r\nlast line without newline")


async def test_maildir_round_trip_keeps_bytes_and_prepends_return_path(
    tmp_path: Path, make_cfg: Callable[..., Config]
) -> None:
    d = Deliverer(make_cfg({"local.test": "maildir:mail"}))  # relative to data_dir
    try:
        env = Envelope(mail_from="a@src.test", rcpt_to=["Bob@Local.Test"])
        out = await d.deliver(env, MSG, ["Bob@Local.Test"])
    finally:
        await d.aclose()
    assert out[0].status is RcptStatus.DELIVERED
    assert out[0].route == f"maildir:{tmp_path / 'mail'}"
    box = tmp_path / "mail" / "bob@local.test"
    assert sorted(p.name for p in box.iterdir()) == ["cur", "new", "tmp"]
    assert list((box / "tmp").iterdir()) == []
    (delivered,) = list((box / "new").iterdir())
    prefix = b"Return-Path: <a@src.test>\r\nDelivered-To: Bob@Local.Test\r\n"
    assert delivered.read_bytes() == prefix + MSG


async def test_two_deliveries_get_distinct_maildir_files(
    tmp_path: Path, make_cfg: Callable[..., Config]
) -> None:
    d = Deliverer(make_cfg({"*": "maildir:mail"}))
    env = Envelope(mail_from="", rcpt_to=["u@x.test"])
    try:
        for _ in range(3):
            await d.deliver(env, MSG, ["u@x.test"])
    finally:
        await d.aclose()
    files = list((tmp_path / "mail" / "u@x.test" / "new").iterdir())
    assert len(files) == 3
    assert all(f.read_bytes().startswith(b"Return-Path: <>\r\n") for f in files)


async def test_recipient_that_would_escape_the_maildir_root_bounces(
    tmp_path: Path, make_cfg: Callable[..., Config]
) -> None:
    d = Deliverer(make_cfg({"*": "maildir:mail"}))
    rcpts = ["../../etc@x.test", ".hidden@x.test", "a/b@x.test"]
    try:
        out = await d.deliver(Envelope(mail_from="a@src.test", rcpt_to=rcpts), MSG, rcpts)
    finally:
        await d.aclose()
    assert all(o.status is RcptStatus.BOUNCED and "5.1.3" in o.reply for o in out)
    assert not (tmp_path / "etc@x.test").exists()
    assert not (tmp_path / "mail").exists() or list((tmp_path / "mail").iterdir()) == []


async def test_unwritable_maildir_defers(tmp_path: Path, make_cfg: Callable[..., Config]) -> None:
    (tmp_path / "mail").write_text("a file where the maildir root should be")
    d = Deliverer(make_cfg({"*": "maildir:mail"}))
    try:
        out = await d.deliver(Envelope(mail_from="a@src.test", rcpt_to=["u@x.test"]), MSG,
                              ["u@x.test"])
    finally:
        await d.aclose()
    assert out[0].status is RcptStatus.DEFERRED
    assert out[0].reply.startswith("451 4.3.0")
