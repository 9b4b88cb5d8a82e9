"""One parse of a message, shared by the stages that read the same bytes.

The spam stage, the policy engine (decide) and the archive's extractor each used to
run the stdlib parser (:mod:`email.feedparser`, line by line in Python) over the
whole message: the largest CPU cost on the event-loop thread.  :func:`parse` keeps
the last few trees in a small cache keyed by the message bytes, so the stages that
run on the same bytes in the same process share one parse:

* spam and decide run one after the other at receive time; decide sees the bytes
  spam saw with the spam stage's ``X-Spam-Status`` field prepended (the runner adds
  a stage's header fields in front).  A cached tree for the bytes after such a
  prefix of complete header fields is extended with the prefix's fields instead of
  parsing the whole message again (see :func:`_derive`);
* the archive stage (queue worker) re-reads the bytes from the spool: equal bytes,
  a cache hit when the same process received the message.

Every tree is the stdlib's ``compat32`` tree, exactly (same headers, payloads,
preamble, epilogue, defects): :func:`parse` equals
``email.message_from_bytes(data, policy=email.policy.compat32)``.  Each caller gets
its own copy of the tree's nodes (their header lists, defect lists and child lists
are copied; the strings, which are immutable, are shared), so a consumer that adds
a defect (``get_payload(decode=True)`` records base64 defects on the part) or
edits a header cannot change what another consumer sees.

:func:`header_block` cuts a message to its header section for the header-only
parses, which otherwise read the whole body line by line to store it as a payload
nobody reads.

A cache miss is parsed by :class:`_Scanner`, which builds the feed parser's tree
with ``str.find`` over the text instead of pushing every body line through Python
(about 3x faster on multipart mail, more on one big text part), and leaves the
rare constructs it does not reproduce to the stdlib parser.  The differential
tests (tests/gateway/test_mailparse.py) compare it with the stdlib parser on the
MIME corpus and on generated messages.
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import itertools
import json
import marshal
import re
import threading
from collections import OrderedDict
from email import errors
from email.message import Message
from typing import Any, Generic, TypeVar

__all__ = ["MAX_BYTES", "MAX_ENTRIES", "MAX_ENTRY_BYTES", "IndexedMessage", "cached", "clear",
           "header_block", "parse", "parse_as", "stats"]

# A message's tree is needed by the stages of its own transaction and then by the
# queue worker's stages (encrypt, archive), which read it behind a backlog: with 20
# concurrent transactions, 32 entries (16 messages: the spam stage's tree and the
# one derived for decide) were gone before the worker came (bench/relay.py: 87% of
# the archive stage's parses were misses).  The entries are kept per message, in
# the order the messages came (see _live), so 256 entries are the newest trees of
# 256 messages.  The byte cap (keys; the trees' strings are about as large again)
# keeps a burst of large messages from holding memory.
MAX_ENTRIES = 256
MAX_BYTES = 16 * 1024 * 1024
MAX_ENTRY_BYTES = 2 * 1024 * 1024  # a larger message is parsed, not cached

_COMPAT32 = email.policy.compat32

# email.feedparser.headerRE without its "From " and continuation alternatives, and
# with a non-empty name: a line the parser takes as a field of its own.
_FIELD_LINE = re.compile(r"[\041-\071\073-\176]+:")
_FIELD_LINE_B = re.compile(rb"[\041-\071\073-\176]+:")
# Fields the parser itself reads (Content-Type: multipart, boundary, message/*;
# Content-Transfer-Encoding of a multipart): a prefix holding one could change the
# body's parse, so such a prefix is never derived.
_PARSER_FIELDS = ("content-",)

_lock = threading.Lock()


class _Entry:
    """One cached tree: the bytes it is the tree of, and its message's place."""

    __slots__ = ("data", "live", "master", "message", "serial")

    def __init__(self, data: bytes, master: Message, message: int, serial: int) -> None:
        self.data = data
        self.master = master
        self.message = message  # the message (a number) it is an entry of
        self.live = True  # the newest entry of its message (in _live)
        self.serial = serial


# The entries are found by their last bytes, never by a hash of the whole message:
# every parse() is of a new bytes object (each stage's fields are prepended to a
# copy, the archive reads the spool), so a dict keyed by the bytes hashed all of
# them on every call (5 µs for 15 kB; three times per message).  Equal bytes have
# the same last bytes, and the entries under one tail are few (a message's own
# entries, derived from each other); bytes equality compares lengths first.
_TAIL = 64
_tails: dict[bytes, list[_Entry]] = {}
_count = 0
# What goes when the cache is full.  A message leaves an entry per stage that adds
# fields (the check stage's bytes, decide's, the archive's as spooled), each derived
# from the one before and superseding it: the superseded ones go first, then the
# messages in the order they came, each by its newest entry.  The queue worker
# takes messages oldest first, so the messages it has not reached yet are the last
# to go.  (LRU was not: the archive's entries of the messages it had just done are
# newer than those of the ones still waiting, and evicted them first; under
# bench/relay.py, with three entries per message and a backlog of 130 messages per
# process, up to 36% of the archive stage's parses were misses.)  A hit does not
# move its message: it is a later stage of a message already in its place.
_live: OrderedDict[int, _Entry] = OrderedDict()  # message -> its newest entry
_superseded: OrderedDict[int, _Entry] = OrderedDict()  # the others by serial, oldest first
_messages = itertools.count()
_serials = itertools.count()
_size = 0
_stats = {"hits": 0, "derived": 0, "misses": 0}


_K = TypeVar("_K")
_V = TypeVar("_V")


class ValueMemo(dict[_K, _V], Generic[_K, _V]):
    """Facts derived from raw header values, kept per process: the same values recur
    across a burst of mail from the same agents.  Cleared when full, not LRU: cheap,
    and memory stays bounded."""

    def __init__(self, limit: int = 4096) -> None:
        super().__init__()
        self.limit = limit

    def keep(self, key: _K, value: _V) -> _V:
        """Remember ``value`` for ``key``; ``value``."""
        if len(self) >= self.limit:
            self.clear()
        self[key] = value
        return value


class JsonFragments:
    """``encoder``'s text for dict values, remembered by their marshal bytes.

    The policy's rule trace is most of what the spool header, the receipt and the
    metadata row encode for a message, and the same trace recurs from message to
    message; marshalling it costs about a ninth of encoding it.  Equal marshal bytes
    mean equal values of the same exact types in the same order (marshal refuses
    subclasses; True, 1 and 1.0 differ, as do -0.0 and 0.0), and a text is kept only
    after ``encoder`` produced it, so the value held no bytes or other buffer (which
    marshal would not tell apart): equal bytes, equal text.  Anything but a plain dict
    is encoded each time.
    """

    def __init__(self, encoder: json.JSONEncoder, limit: int = 64) -> None:
        self.encoder = encoder
        self._memo: ValueMemo[bytes, str] = ValueMemo(limit=limit)

    def __len__(self) -> int:
        return len(self._memo)

    def clear(self) -> None:
        self._memo.clear()

    def encode(self, value: Any) -> str:
        if type(value) is not dict:
            return self.encoder.encode(value)
        try:
            key = marshal.dumps(value)
        except ValueError:  # a subclass or an object marshal does not know: no memo
            return self.encoder.encode(value)
        found = self._memo.get(key)
        if found is None:
            found = self._memo.keep(key, self.encoder.encode(value))
        return found


_Field = tuple[str, Any]
_MISSING: Any = object()
# Content-Type/-Disposition values: their parsed parameters, by the value as fetched.
_PARAMS: ValueMemo[str, tuple[tuple[str, Any], ...]] = ValueMemo()


class IndexedMessage(Message):
    """compat32's :class:`~email.message.Message`, with the same answers, but a field
    is found by name in an index instead of a scan that lowers every field name.

    Every stage asks each node for its Content-Type, -Disposition and their
    parameters many times (``get_content_type``, ``get_param``, ``get_filename``,
    ``get_content_charset`` all go through ``get`` / ``in``); on a top-level header
    section of 20 fields the stdlib lowers 20 names per question.

    The index ``_ix`` is (a snapshot of ``_headers``, {lower-case name: [fields]}).
    It is valid while the snapshot equals ``_headers`` (a list compare: the field
    tuples are the same objects, so one pointer test each), whatever changed the
    list: the stdlib's mutators (``__setitem__``, ``__delitem__``, ``set_raw``,
    ``add_header``, ``replace_header``, ``set_param`` and friends, ``set_boundary``
    assigning a new list) or anyone's direct edit.  ``replace_header`` also drops it
    explicitly: it may put a value that compares equal to the old one but is another
    object (a ``Header`` equals its text).  The index is never changed in place, so
    the copies :func:`parse` hands out share their master's.
    """

    _ix: tuple[list[_Field], dict[str, list[_Field]]] | None = None

    def _fields(self) -> dict[str, list[_Field]]:
        headers: list[_Field] = self._headers  # type: ignore[attr-defined]
        ix = self._ix
        if ix is not None and ix[0] == headers:
            return ix[1]
        index: dict[str, list[_Field]] = {}
        for field in headers:
            name = field[0].lower()
            found = index.get(name)
            if found is None:
                index[name] = [field]
            else:
                found.append(field)
        self._ix = (list(headers), index)
        return index

    def get(self, name: str, failobj: Any = None) -> Any:
        found = self._fields().get(name.lower())
        if found is None:
            return failobj
        k, v = found[0]
        return self.policy.header_fetch_parse(k, v)

    def get_all(self, name: str, failobj: Any = None) -> Any:
        found = self._fields().get(name.lower())
        if found is None:
            return failobj
        fetch = self.policy.header_fetch_parse
        return [fetch(k, v) for k, v in found]

    def __contains__(self, name: object) -> bool:
        return name.lower() in self._fields()  # type: ignore[attr-defined]

    def raw_values(self, name: str) -> list[Any]:
        """The stored values of the fields called ``name`` (any case), in order: what
        ``[v for k, v in raw_items() if k.lower() == name.lower()]`` gives."""
        return [v for _, v in self._fields().get(name.lower(), ())]

    def replace_header(self, _name: str, _value: Any) -> None:
        self._ix = None
        super().replace_header(_name, _value)

    def _get_params_preserve(self, failobj: Any, header: str) -> Any:
        # Equal values give equal parameters (the stdlib's parse reads nothing but
        # the value): the result is kept per value, and a fresh list is returned as
        # the stdlib returns one (its tuples are immutable).
        value = self.get(header, _MISSING)
        if value is _MISSING:
            return failobj
        if type(value) is not str:
            return super()._get_params_preserve(failobj, header)  # type: ignore[misc]
        params = _PARAMS.get(value)
        if params is None:
            params = _PARAMS.keep(
                value, tuple(super()._get_params_preserve(failobj, header)))  # type: ignore[misc]
        return list(params)


def header_block(data: bytes) -> bytes:
    """``data`` up to and including its first empty line (RFC 5322 §2.1), or all of it.

    Lines end as :mod:`email.feedparser` ends them: at CRLF, a lone CR or a lone LF.
    The parser stops reading header fields at the latest at that empty line, so a
    header-only parse of the block gives the same fields and defects as one of the
    whole message; only the (unread) payload is shorter.
    """
    if data[:1] in (b"\r", b"\n"):
        start = 0  # no fields at all: the first line is empty
    else:
        # An empty line begins right after a line end (LF, or CR not followed by LF)
        # and is itself only a line end.
        found = data.find(b"\n\r")
        end = len(data) if found < 0 else found + 2
        for sep in (b"\n\n", b"\r\r"):
            i = data.find(sep, 0, end)
            if i >= 0 and (found < 0 or i < found):
                found = i
                end = i + 2
        if found < 0:
            return data
        start = found + 1
    stop = start + 2 if data[start:start + 2] == b"\r\n" else start + 1
    return data[:stop]


def _stdlib(data: bytes) -> Message:
    return email.parser.BytesParser(IndexedMessage, policy=_COMPAT32).parsebytes(data)


def _parse(data: bytes) -> Message:
    """The stdlib's compat32 tree of ``data``, built by :class:`_Scanner` (which
    falls back to the stdlib parser for what it does not reproduce exactly)."""
    try:
        return _Scanner(data.decode("ascii", "surrogateescape")).parse()
    except _Fallback:
        return _stdlib(data)


class _Fallback(Exception):
    """A construct the scanner leaves to the stdlib parser."""


_EOL = re.compile(r"\r\n|\r|\n")
# email.feedparser.headerRE: a field, a continuation or an mbox "From " line.
_HEADER_LINE = re.compile(r"(From |[\041-\071\073-\176]*:|[\t ])")
_IDENTITY_CTE = ("7bit", "8bit", "binary")
_MAX_NESTING = 50  # deeper trees go to the stdlib parser (and its recursion limit)


class _Scanner:
    """email.feedparser's compat32 tree without feeding the body line by line.

    The feed parser reads every line and asks each one whether it is a boundary
    of an enclosing multipart (RFC 2046 §5.1.1; §5.1.2: an outer boundary ends
    the inner parts too).  Here the next such line is found with ``str.find`` of
    each active "--boundary" (checked to start a line and to end as a delimiter
    does), and a part's text is a slice.  Header sections are read line
    by line as the feed parser reads them (they are short), with the same
    defects in the same order.  message/delivery-status, an mbox "From " line
    that ends a part's header section, and very deep nesting raise
    :class:`_Fallback`.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.last: Message | None = None  # FeedParser._last: newline cleansing target

    def parse(self) -> Message:
        root, _ = self.message(0, [], None)
        if root.get_content_maintype() == "multipart" and not root.is_multipart():
            root.defects.append(errors.MultipartInvariantViolationDefect())
        return root

    # -- lines -------------------------------------------------------------------
    def line_end(self, pos: int) -> int:
        m = _EOL.search(self.text, pos)
        return len(self.text) if m is None else m.end()

    def delimiter(self, i: int, boundary: str) -> tuple[bool, bool] | None:
        """(closing?, has a line end?) if the line at ``i`` is a delimiter of
        ``boundary``, else None: "--", the boundary, "--" if closing, blanks, then
        the line's end (RFC 2046 §5.1.1; the feed parser's ``boundaryre``)."""
        text, n = self.text, len(self.text)
        if not text.startswith("--", i) or not text.startswith(boundary, i + 2):
            return None
        j = i + 2 + len(boundary)
        closing = text.startswith("--", j)
        if closing:
            j += 2
        while j < n and text[j] in " \t":
            j += 1
        if j < n and text[j] not in "\r\n":
            return None
        return closing, j < n

    def next_delimiter(self, pos: int, boundaries: list[str]) -> int:
        """Start of the first line at or after ``pos`` (a line start) that is a
        delimiter of any of ``boundaries``, or the end of the text."""
        text = self.text
        best = len(text)
        for boundary in boundaries:
            sep = "--" + boundary
            i = text.find(sep, pos, best + len(sep))
            while 0 <= i < best:
                if (i == 0 or text[i - 1] in "\r\n") and self.delimiter(i, boundary):
                    best = i
                    break
                i = text.find(sep, i + 1, best + len(sep))
        return best

    # -- one message or part (FeedParser._parsegen) ---------------------------------
    def message(self, pos: int, outer: list[str], parent: Message | None,
                depth: int = 0) -> tuple[Message, int]:
        if depth > _MAX_NESTING:
            raise _Fallback
        msg = IndexedMessage(policy=_COMPAT32)
        if parent is not None:
            if parent.get_content_type() == "multipart/digest":
                msg.set_default_type("message/rfc822")
            parent.attach(msg)
        self.last = msg
        text, n = self.text, len(self.text)
        stop = self.next_delimiter(pos, outer)  # the (false) end of this part
        lines: list[str] = []
        while pos < stop:
            end = self.line_end(pos)
            line = text[pos:end]
            if not _HEADER_LINE.match(line):
                if line[0] not in "\r\n":
                    msg.defects.append(errors.MissingHeaderBodySeparatorDefect())
                else:
                    pos = end  # the empty line ending the header section
                break
            lines.append(line)
            pos = end
        self.headers(msg, lines)
        ctype = msg.get_content_type()
        if ctype == "message/delivery-status":
            raise _Fallback
        maintype = ctype.split("/")[0]
        if maintype == "message":
            _, pos = self.message(pos, outer, msg, depth + 1)
            return msg, pos
        if maintype == "multipart":
            return msg, self.multipart(msg, pos, stop, outer, depth)
        msg.set_payload(text[pos:stop])
        return msg, stop if stop <= n else n

    def headers(self, msg: Message, lines: list[str]) -> None:
        """FeedParser._parse_headers."""
        name = ""
        value: list[str] = []
        for lineno, line in enumerate(lines):
            if line[0] in " \t":
                if not name:
                    msg.defects.append(errors.FirstHeaderLineIsContinuationDefect(line))
                    continue
                value.append(line)
                continue
            if name:
                msg.set_raw(*_COMPAT32.header_source_parse(value))
                name, value = "", []
            if line.startswith("From "):
                if lineno == 0:
                    m = NLCRE_EOL.search(line)
                    msg.set_unixfrom(line[: m.start()] if m else line)
                    continue
                if lineno == len(lines) - 1:
                    raise _Fallback  # pushed back into the body: not a slice of the text
                msg.defects.append(errors.MisplacedEnvelopeHeaderDefect(line))
                continue
            i = line.find(":")
            if i == 0:
                msg.defects.append(errors.InvalidHeaderDefect("Missing header name."))
                continue
            name, value = line[:i], [line]
        if name:
            msg.set_raw(*_COMPAT32.header_source_parse(value))

    def multipart(self, msg: Message, pos: int, stop: int, outer: list[str],
                  depth: int) -> int:
        text = self.text
        boundary = msg.get_boundary()
        if boundary is None:
            msg.defects.append(errors.NoBoundaryInMultipartDefect())
            msg.set_payload(text[pos:stop])
            return stop
        if "\r" in boundary or "\n" in boundary:
            # A boundary from a field folded inside it: the feed parser matches it
            # against one line at a time, str.find would match it across lines.
            raise _Fallback
        if str(msg.get("content-transfer-encoding", "8bit")).lower() not in _IDENTITY_CTE:
            msg.defects.append(errors.InvalidMultipartContentTransferEncodingDefect())
        inner = [*outer, boundary]
        # Preamble: up to the first line that is a delimiter of this or an outer
        # multipart (an outer one is the false end of this one).
        q = min(self.next_delimiter(pos, inner), stop)
        first = self.delimiter(q, boundary) if q < stop else None
        if first is None or first[0]:
            # No opening delimiter: the text is the payload (RFC 2046 §5.1.1).
            msg.defects.append(errors.StartBoundaryNotFoundDefect())
            msg.set_payload(text[pos:q])
            msg.epilogue = ""
            return stop
        if q > pos:
            # RFC 2046 §5.1.1: the line end before a delimiter belongs to it.
            msg.preamble = _strip_eol(text[pos:q])
        close_seen = False
        has_eol = False
        while True:
            # q is an inter-part delimiter line: skip it and any delimiter lines of
            # this multipart that follow it (an outer one is a false end: stop).
            while q < stop and self.delimiter(q, boundary):
                q = self.line_end(q)
            _, q = self.message(q, inner, msg, depth + 1)
            last = self.last
            assert last is not None
            if last.get_content_maintype() == "multipart":
                epilogue = last.epilogue
                if epilogue == "":
                    last.epilogue = None
                elif epilogue is not None:
                    last.epilogue = _strip_eol(epilogue)
            else:
                payload = vars(last)["_payload"]
                if isinstance(payload, str):
                    vars(last)["_payload"] = _strip_eol(payload)
            self.last = msg
            if q >= stop:
                break  # the end of the text, or an outer multipart's delimiter
            found = self.delimiter(q, boundary)
            if found is None:
                raise _Fallback  # cannot happen: the part ended at a delimiter line
            if found[0]:
                close_seen, has_eol = True, found[1]
                q = self.line_end(q)
                break
        if not close_seen:
            msg.defects.append(errors.CloseBoundaryNotFoundDefect())
            return q if q < stop else stop
        # Everything up to the false end is the epilogue; a line end after the
        # closing delimiter belongs to it (the feed parser's "epilogue = ['']").
        msg.epilogue = text[q:stop] if has_eol else ""
        return stop


NLCRE_EOL = re.compile(r"(\r\n|\r|\n)\Z")


def _strip_eol(text: str) -> str:
    """``text`` without its last line end (the feed parser's NLCRE_eol)."""
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith(("\r", "\n")) else text


def _clone(node: Message, policy: Any) -> Message:
    new = Message.__new__(type(node))
    state = vars(node).copy()
    state["_headers"] = list(state["_headers"])
    state["defects"] = list(state["defects"])
    if policy is not None:
        state["policy"] = policy
    vars(new).update(state)
    return new


def _copy(root: Message, policy: Any = None) -> Message:
    """A private copy of the tree's nodes (iterative: a deep tree must not recurse)."""
    new_root = _clone(root, policy)
    stack = [new_root]
    while stack:
        state = vars(stack.pop())
        payload = state["_payload"]
        if isinstance(payload, list):
            children = [_clone(child, policy) for child in payload]
            state["_payload"] = children
            stack.extend(children)
    return new_root


def _derive(data: bytes) -> tuple[Message, _Entry] | None:
    """The tree of ``data`` built from a cached tree of its tail, if ``data`` is that
    tail with complete header fields prepended (the runner's way of adding a stage's
    fields).  Called with the lock held; returns a new master tree and the tail's
    entry, or None."""
    for entry in reversed(_tails.get(data[-_TAIL:], ())):
        key = entry.data
        if len(key) >= len(data) or not data.endswith(key):
            continue
        # The tail must open with a field of its own (not a continuation, an mbox
        # "From " line, an empty line or body text): then the parser reads the
        # prefix's fields, then the tail's, exactly as it read the tail alone.
        if not _FIELD_LINE_B.match(key):
            return None
        prefix = data[: len(data) - len(key)].decode("ascii", "surrogateescape")
        lines = io.StringIO(prefix, newline="").readlines()  # the parser's line split
        if not lines[-1].endswith("\n") or not _FIELD_LINE.match(lines[0]):
            return None
        for line in lines:
            if line[0] in " \t":
                continue  # RFC 5322 §2.2.3 folding: part of the field above
            if not _FIELD_LINE.match(line) or line.lower().startswith(_PARSER_FIELDS):
                return None
        # FeedParser._parse_headers on these lines: a field with its continuations.
        fields: list[list[str]] = []
        for line in lines:
            if line[0] in " \t":
                fields[-1].append(line)
            else:
                fields.append([line])
        head = [_COMPAT32.header_source_parse(value) for value in fields]
        base = entry.master
        master = _clone(base, None)
        vars(master)["_headers"] = head + vars(base)["_headers"]
        if isinstance(master, IndexedMessage):
            master._fields()  # once here, not in each copy handed out
        return master, entry
    return None


def _store(data: bytes, master: Message, base: _Entry | None = None) -> None:
    """Cache ``master`` as the tree of ``data``: the newest entry of ``base``'s
    message if it was derived from ``base``'s tree, else of a new message."""
    global _size, _count
    if len(data) > MAX_ENTRY_BYTES:
        return
    if base is not None and base.live:
        base.live = False
        _superseded[base.serial] = base
        message = base.message
    else:
        message = next(_messages)
    entry = _Entry(data, master, message, next(_serials))
    _tails.setdefault(data[-_TAIL:], []).append(entry)
    _count += 1
    _size += len(data)
    _live[message] = entry  # a message's place in _live stays where it came
    while _count > MAX_ENTRIES or _size > MAX_BYTES:
        if _superseded:
            _, old = _superseded.popitem(last=False)
        else:
            _, old = _live.popitem(last=False)
            old.live = False
        _count -= 1
        _size -= len(old.data)
        tail = old.data[-_TAIL:]
        same_tail = _tails[tail]
        same_tail.remove(old)  # by identity: _Entry has no __eq__
        if not same_tail:
            del _tails[tail]


def _find(data: bytes) -> _Entry | None:
    """The entry whose bytes equal ``data``, or None.  Called with the lock held."""
    for entry in _tails.get(data[-_TAIL:], ()):
        if entry.data == data:
            return entry
    return None


def _lookup(data: bytes) -> Message | None:
    """The master tree of ``data``, found or derived; None. Called with the lock held."""
    entry = _find(data)
    if entry is not None:
        _stats["hits"] += 1
        return entry.master
    derived = _derive(data)
    if derived is None:
        return None
    master, base = derived
    _stats["derived"] += 1
    _store(data, master, base)
    return master


def parse(data: bytes) -> Message:
    """``email.message_from_bytes(data, policy=compat32)``, from the cache when possible.

    The tree returned is the caller's own copy.  An exception of the parser
    propagates as it would from the stdlib (and nothing is cached).
    """
    with _lock:
        master = _lookup(data)
        if master is None:
            _stats["misses"] += 1
    if master is None:
        master = _parse(data)  # outside the lock: other threads keep their hits
        with _lock:
            if _find(data) is None:
                _store(data, master)
    return _copy(master)


def cached(data: bytes) -> Message | None:
    """The tree of ``data`` (a copy) if the cache holds it or the tree of its tail
    (:func:`_derive`), else None: never parses the message."""
    with _lock:
        master = _lookup(data)
    return None if master is None else _copy(master)


def _decisions(node: Message) -> tuple[Any, ...]:
    """What email.feedparser asks a node while it parses (the only header reads that
    steer the parse): its content type and, for a multipart, its boundary and
    whether its Content-Transfer-Encoding is an identity encoding."""
    ctype = node.get_content_type()
    if ctype.split("/")[0] != "multipart":
        return (ctype,)
    cte = str(node.get("content-transfer-encoding", "8bit")).lower()
    return ctype, node.get_boundary(), cte in ("7bit", "8bit", "binary")


def _plain(value: object) -> bool:
    # A value both policies return unchanged: no line break to unfold, no 8-bit byte
    # (compat32 returns those as email.header.Header objects).
    return isinstance(value, str) and value.isascii() and "\r" not in value \
        and "\n" not in value


def _repolicied(tree: Message, policy: email.policy.Compat32) -> Message | None:
    """``tree`` (a private compat32 copy) with every node on ``policy``, or None when
    a parse with ``policy`` could have built a different tree."""
    stack = [tree]
    while stack:
        node = stack.pop()
        state = vars(node)
        if not all(_plain(v) for k, v in state["_headers"]
                   if k.lower() in ("content-type", "content-transfer-encoding")):
            try:
                before = _decisions(node)
                state["policy"] = policy
                after = _decisions(node)
            except Exception:
                return None
            if before != after:
                return None
        state["policy"] = policy
        payload = state["_payload"]
        if isinstance(payload, list):
            stack.extend(payload)
    return tree


def parse_as(data: bytes, policy: email.policy.Compat32) -> Message:
    """``email.message_from_bytes(data, policy=policy)`` for a ``policy`` that is
    compat32 except for how it returns a field (``header_fetch_parse``), using the
    shared compat32 tree when that policy's parse would build the same tree.

    Such a policy stores fields as compat32 does, so the trees differ only if one of
    the parser's own header reads (:func:`_decisions`) answers differently, e.g. a
    boundary folded across lines; then ``data`` is parsed with ``policy`` itself.
    """
    try:
        tree = _repolicied(parse(data), policy)
    except Exception:
        tree = None
    if tree is None:
        tree = email.parser.BytesParser(IndexedMessage, policy=policy).parsebytes(data)
    return tree


def stats() -> dict[str, int]:
    """Cache hits, derived trees and misses since the start (or :func:`clear`)."""
    with _lock:
        return {**_stats, "entries": _count, "bytes": _size}


def clear() -> None:
    global _size, _count
    with _lock:
        _tails.clear()
        _live.clear()
        _superseded.clear()
        _size = _count = 0
        for k in _stats:
            _stats[k] = 0
