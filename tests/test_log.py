"""Structured log lines: their content, and when they reach the file."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import log


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    saved = list(log.LOGGER.handlers), log.LOGGER.level, log.LOGGER.propagate
    path = tmp_path / "coffer.log"
    log.setup(file=path)
    yield path
    for h in log.LOGGER.handlers:
        h.close()
    log.LOGGER.handlers[:], log.LOGGER.level, log.LOGGER.propagate = saved


FIELDS = {"qid": "0123ABC", "rcpt": "jürgen@dst.test", "attempt": 2, "held": False,
          "path": Path("/x/y"), "raw": b"\xff", "recipients": ["a@b", "c@d"], "none": None}


def test_json_line_is_what_json_dumps_gives(log_file: Path) -> None:
    log.event("delivery", **FIELDS)  # type: ignore[arg-type]
    (line,) = log_file.read_text(encoding="utf-8").splitlines()
    obj = json.loads(line)
    expected = {"ts": obj["ts"], "level": "info", "event": "delivery", **FIELDS}
    assert line == json.dumps(expected, ensure_ascii=False, default=str)


def test_text_format_keeps_its_fields(log_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "text.log"
    log.LOGGER.handlers[0].close()
    log.setup(fmt="text", file=path)  # the fixture restores the logger afterwards
    log.event("done", qid="Q1", attempts=1)
    assert path.read_text().split(" ", 1)[1] == 'info done qid="Q1" attempts=1\n'


@pytest.fixture
def worker_one() -> Iterator[None]:
    saved = dict(log._PROCESS_FIELDS)
    log.bind_process(worker=1)
    yield
    log._PROCESS_FIELDS.clear()
    log._PROCESS_FIELDS.update(saved)


@pytest.mark.usefixtures("worker_one")
def test_a_worker_process_names_itself_on_every_line(log_file: Path, tmp_path: Path) -> None:
    log.event("archive_backend_down", error="refused")  # the direct path
    log.LOGGER.addHandler(logging.NullHandler())  # now through the formatter
    log.event("delivery", qid="Q1")
    log.LOGGER.warning("plain")
    first, second, third = (json.loads(line) for line in log_file.read_text().splitlines())
    assert list(first) == ["ts", "level", "event", "worker", "error"]
    assert first["worker"] == second["worker"] == third["worker"] == 1
    assert second["qid"] == "Q1" and third["event"] == "plain"
    path = tmp_path / "text.log"
    log.LOGGER.handlers[0].close()
    log.setup(fmt="text", file=path)
    log.event("done", qid="Q1")
    assert path.read_text().split(" ", 1)[1] == 'info done worker=1 qid="Q1"\n'


def test_below_level_is_not_written(log_file: Path) -> None:
    log.event("noise", level=logging.DEBUG, x=1)
    assert log_file.read_text() == ""


def test_on_the_event_loop_lines_reach_the_file_at_the_end_of_the_iteration(
    log_file: Path,
) -> None:
    async def main() -> list[str]:
        seen = []
        log.event("one", n=1)
        log.event("two", n=2)
        seen.append(log_file.read_text())  # still this iteration: not flushed yet
        await asyncio.sleep(0)
        seen.append(log_file.read_text())
        return seen

    during, after = asyncio.run(main())
    assert during == ""
    assert [json.loads(x)["event"] for x in after.splitlines()] == ["one", "two"]


def test_off_the_event_loop_each_line_is_written_at_once(log_file: Path) -> None:
    log.event("one", n=1)
    assert json.loads(log_file.read_text())["n"] == 1

    async def in_thread() -> str:
        def work() -> str:
            log.event("two", n=2)
            return log_file.read_text()
        return await asyncio.get_running_loop().run_in_executor(None, work)

    assert asyncio.run(in_thread()).count("\n") == 2


def test_caller_independent_records_keep_their_fields(
    log_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log.LOGGER.addHandler(caplog.handler)
    try:
        log.event("accepted", qid="Q2", size=10)
    finally:
        log.LOGGER.removeHandler(caplog.handler)
    (rec,) = caplog.records
    assert rec.getMessage() == "accepted" and rec.fields == {"qid": "Q2", "size": 10}  # type: ignore[attr-defined]


def test_a_flush_left_pending_by_a_finished_loop_does_not_stall_the_next(
    log_file: Path,
) -> None:
    async def log_and_stop(name: str) -> None:
        log.event(name)
        asyncio.get_running_loop().stop()  # the loop ends before its flush runs

    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(log_and_stop("first"))
        loop.run_forever()
        assert task.done()
    finally:
        loop.close()

    async def later() -> str:
        log.event("second")
        await asyncio.sleep(0)
        return log_file.read_text()

    assert [json.loads(x)["event"] for x in asyncio.run(later()).splitlines()] == [
        "first", "second"]


def test_a_line_written_directly_is_the_formatters_line() -> None:
    record = logging.LogRecord("coffer", logging.WARNING, "(unknown file)", 0, "delivery", (),
                               None)
    record.fields = FIELDS
    assert log._json_line(record.created, logging.WARNING, "delivery", FIELDS) == \
        log._JsonFormatter().format(record)


def test_a_field_named_like_a_fixed_key_replaces_its_value_in_place(log_file: Path) -> None:
    log.event("x", level=logging.WARNING, level2=1, event="y")
    (line,) = log_file.read_text().splitlines()
    assert list(json.loads(line).items())[1:] == [("level", "warning"), ("event", "y"),
                                                  ("level2", 1)]


def test_a_filter_on_the_handler_still_applies(log_file: Path) -> None:
    handler = log.LOGGER.handlers[0]
    handler.addFilter(lambda r: r.getMessage() != "secret")
    log.event("secret")
    log.event("public")
    assert [json.loads(x)["event"] for x in log_file.read_text().splitlines()] == ["public"]


def test_a_closed_file_handler_reopens_its_file(log_file: Path) -> None:
    log.LOGGER.handlers[0].close()
    log.event("after_close", n=1)
    log.LOGGER.handlers[0].flush()
    assert json.loads(log_file.read_text())["event"] == "after_close"


def test_a_write_error_goes_to_handle_error(
    log_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    handler = log.LOGGER.handlers[0]
    seen: list[logging.LogRecord] = []
    monkeypatch.setattr(handler, "handleError", seen.append)
    monkeypatch.setattr(handler, "stream", _Broken())
    log.event("lost", n=3)
    assert [(r.getMessage(), r.fields) for r in seen] == [("lost", {"n": 3})]  # type: ignore[attr-defined]


class _Broken:
    def write(self, text: str) -> int:
        raise OSError("disk gone")

    def flush(self) -> None:
        pass


def test_a_handler_level_above_the_events_still_drops_it(log_file: Path) -> None:
    log.LOGGER.handlers[0].setLevel(logging.WARNING)
    log.event("quiet")
    log.event("loud", level=logging.WARNING)
    assert [json.loads(x)["event"] for x in log_file.read_text().splitlines()] == ["loud"]


def test_with_propagation_on_the_root_handlers_get_the_event_too(
    log_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log.LOGGER.propagate = True  # the fixture restores it
    with caplog.at_level(logging.INFO):
        log.event("both", n=1)
    assert "both" in [r.getMessage() for r in caplog.records]
    log.LOGGER.handlers[0].flush()
    assert json.loads(log_file.read_text())["event"] == "both"


def test_the_shared_encoder_fails_like_a_fresh_one_and_then_works_again(
    log_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # _json_line reuses one C encoder: a circular field still fails as json.dumps
    # does (handed to handleError, nothing written), and leaves nothing behind that
    # would fail the next line, which shares a list twice (not a cycle).
    handler = log.LOGGER.handlers[0]
    # the direct path only (pytest may have added its capture handlers)
    monkeypatch.setattr(log.LOGGER, "handlers", [handler])
    assert log._direct(logging.INFO) is handler
    seen: list[logging.LogRecord] = []
    monkeypatch.setattr(handler, "handleError", seen.append)
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular reference"):
        json.dumps(loop, ensure_ascii=False, default=str)
    with pytest.raises(ValueError, match="Circular reference"):
        log._json_line(0.0, logging.INFO, "cycle", {"ring": loop})
    assert log._MARKERS == {}
    log.event("cycle", ring=loop)
    assert [r.getMessage() for r in seen] == ["cycle"]
    shared = ["a@b"]
    fields: dict[str, Any] = {**FIELDS, "one": shared, "two": {"again": shared}}
    log.event("after", **fields)
    (line,) = log_file.read_text(encoding="utf-8").splitlines()
    expected = {"ts": json.loads(line)["ts"], "level": "info", "event": "after", **fields}
    assert line == json.dumps(expected, ensure_ascii=False, default=str)
    assert log._MARKERS == {}
