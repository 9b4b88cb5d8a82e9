"""HTML to the text a reader sees, with its links and its images: one converter for the
spam rules (gateway.check.spam), the archive's full-text index and document text
(archive.extract) and policy body matching (policies.message).

One forward pass over the markup, ``str.find`` from one ``<`` to the next, each tag
read once by a regular expression that cannot backtrack (possessive quantifiers
over alternatives that open with different characters): hostile HTML - thousands
of unclosed ``<a>``, comments or quotes - costs time linear in its length.  The
stdlib's HTMLParser, which the archive and the policies used before, promises no
such bound (it rescans its buffered rest when a construct is unfinished) and took
about 3-4x the time on the HTML parts of the test corpus.

The rules follow the HTML Living Standard's tokenizer (§13.2.5) where it matters
for what is shown, simplified where it does not:

* ``<`` opens a tag only before a letter, ``/``, ``!`` or ``?``; otherwise it is text
  (§13.2.5.6 tag open state: "a < b" reads "a < b").
* A tag ends at the first ``>`` outside a quoted attribute value; a value's quote
  opens only after ``=`` (§13.2.5.36-38).  A tag, comment or quoted value left open
  at the end of the input hides the rest, as a browser hides it (the "eof-in-tag"
  and "eof-in-comment" errors drop the unfinished token).
* Comments: ``<!--`` to ``-->`` or ``--!>``, and the abrupt ``<!-->`` and ``<!--->``
  (§13.2.5.43-52); ``<!DOCTYPE>``, ``<![CDATA[``, ``<?...>`` and ``</ ...>`` are bogus
  comments up to the next ``>`` (§13.2.5.41).
* script, style and title hold raw text up to their end tag (§13.2.5.2-3); their
  content is never text.  template content is inert (§4.12.3) and hidden, nested
  templates counted.  noscript is shown: mail readers run no scripts, and a browser
  without scripting parses and shows its content (§4.12.2), so a link or a word
  placed there is seen by the reader and must be seen by the spam rules.
* ``<head>`` itself hides nothing: in the "in head" insertion mode (§13.2.6.4.4) any
  text or body element ends the head, so a page whose head is left open (or holds
  text) shows that text; only the elements above are hidden.
* Block elements give a line break, every other tag a space, so that the words on
  either side of a tag never run together; comments give nothing.
* Character references are decoded in text, anchor text and ``href`` values
  (:func:`html.unescape`, the standard's table).

:func:`html_to_text` never raises on any ``str``.
"""

from __future__ import annotations

import html
import re
from typing import NamedTuple

MAX_LINKS = 200  # (href, anchor text) pairs kept per document
MAX_ANCHOR = 300  # characters of anchor text gathered per link

# §13.2.5.8 tag name state ends at ASCII white space, "/" or ">".  The attributes
# part: runs of characters that are neither ">", a quote nor "=", an "=" with the
# quoted value after it (an unclosed one runs to the end: no ">" follows and the
# match fails), or a stray quote (part of a name or of an unquoted value).  Each
# alternative opens with a different character and every quantifier is
# possessive, so a failed match costs one scan, never a backtracking search.
_TAG = re.compile(
    r"""<(/?)([A-Za-z][^\t\n\f\r />]*+)"""
    r"""((?:[^>"'=]++|=[\t\n\f\r ]*+(?:"[^"]*+(?:"|\Z)|'[^']*+(?:'|\Z))?+|["'])*+)>"""
)
# One attribute (§13.2.5.32-39): its name, then its value quoted either way or bare.
_ATTR = re.compile(
    r"""([^\t\n\f\r /=>][^\t\n\f\r /=>]*+)(?:[\t\n\f\r ]*+=[\t\n\f\r ]*+"""
    r"""(?:"([^"]*+)"?|'([^']*+)'?|([^\t\n\f\r >]*+)))?+"""
)
_COMMENT_END = re.compile(r"--!?>")
# The end tag of a raw text element: its name, then white space, "/" or ">"
# (§13.2.5.11 "appropriate end tag").
_RAW_END = {
    name: re.compile(rf"</{name}[\t\n\f\r />]", re.IGNORECASE)
    for name in ("script", "style", "title")
}
_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_MARKUP_OPEN = re.compile(r"<[A-Za-z/!?]")  # a "<" that opens markup (§13.2.5.6)
_HIDDEN = frozenset({"template"})  # content parsed as markup, but never shown
_BLOCK = frozenset({
    "address", "article", "aside", "blockquote", "br", "caption", "center", "dd", "details",
    "div", "dl", "dt", "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3",
    "h4", "h5", "h6", "header", "hr", "legend", "li", "main", "nav", "ol", "p", "pre",
    "section", "summary", "table", "td", "th", "tr", "ul",
})
_TEXT_SPACE = str.maketrans("\t\n\r\f", "    ")  # HTML's white space, as one line


class HtmlText(NamedTuple):
    """What :func:`html_to_text` reads out of one HTML document."""

    text: str
    links: list[tuple[str, str]]  # (href, anchor text), in order, at most MAX_LINKS
    images: int  # <img> elements shown


def html_to_text(markup: str, *, normalise: bool = False) -> HtmlText:
    """The visible text of ``markup``, its ``<a href>`` links and how many ``<img>``.

    Unnormalised, the text keeps the document's own white space, with a line break
    for each block tag and a space for each other tag (what the spam rules count and
    tokenize).  ``normalise=True`` lays it out as a browser would (HTML white space
    collapses, CSS 2.1 §16.6.1 white-space: normal): each run of white space is one
    space (a no-break space too), lines are cut only by block tags, with no space
    at either end, at most one blank line between them, and none at the start or
    end: the text to index, search and match policies against.
    """
    out: list[str] = []
    links: list[tuple[str, str]] = []
    images = 0
    href = ""
    anchor: list[str] | None = None  # the text of the open <a href>
    anchor_len = 0
    hidden = 0  # open <template> elements
    pos = start = 0  # pos: where to look for the next "<"; start: of the pending text
    n = len(markup)
    while True:
        # "<" before anything else is text: the pending text goes on past it
        found_lt = _MARKUP_OPEN.search(markup, pos)
        lt = n if found_lt is None else found_lt.start()
        # The text before this piece of markup (or the end): entities decoded.
        if lt > start and not hidden:
            chunk = markup[start:lt]
            if "&" in chunk:
                chunk = html.unescape(chunk)
            if normalise:
                chunk = chunk.translate(_TEXT_SPACE)
            out.append(chunk)
            if anchor is not None and anchor_len < MAX_ANCHOR:
                anchor.append(chunk[:MAX_ANCHOR - anchor_len])
                anchor_len += len(anchor[-1])
        if lt == n:
            break
        c = markup[lt + 1]
        if c == "!":
            if markup.startswith("<!--", lt):
                if markup.startswith(">", lt + 4):
                    pos = start = lt + 5  # <!-->
                    continue
                if markup.startswith("->", lt + 4):
                    pos = start = lt + 6  # <!--->
                    continue
                end = _COMMENT_END.search(markup, lt + 4)
                if end is None:
                    break  # eof-in-comment: the rest is the comment
                pos = start = end.end()
                continue
            gt = markup.find(">", lt + 2)  # <!DOCTYPE ...>, <![CDATA[ ...>: bogus comments
            if gt < 0:
                break
            pos = start = gt + 1
            continue
        m = _TAG.match(markup, lt) if c != "?" else None
        if m is None:
            if c == "?" or (c == "/" and markup[lt + 2:lt + 3] not in _LETTERS):
                # <?...> and "</" not before a letter: a bogus comment up to ">"
                # (§13.2.5.6-7; "</>" is dropped the same way)
                gt = markup.find(">", lt + 2)
                if gt < 0:
                    break
                pos = start = gt + 1
                continue
            break  # eof-in-tag: the unfinished tag and all after it are dropped
        pos = start = m.end()
        closing, name = m.group(1, 2)  # the attributes are cut out only for <a>
        name = name.lower()
        raw_end = _RAW_END.get(name)
        if raw_end is not None:
            if closing:
                continue  # a stray end tag of a raw text element
            # Raw text: nothing in it is markup, it ends at its end tag or the end.
            end = raw_end.search(markup, pos)
            if end is None:
                break
            pos = start = end.start()
            out.append(" ")  # the words on either side stay apart
            continue
        if name in _HIDDEN:
            hidden = hidden - 1 if closing and hidden else hidden + (not closing)
            out.append(" ")
            continue
        if hidden:
            continue
        if name == "a":
            if anchor is not None:
                links.append((href, " ".join("".join(anchor).split())))
                anchor = None
            if not closing and len(links) < MAX_LINKS:
                found = _href(m.group(3))
                if found is not None:
                    href, anchor, anchor_len = found, [], 0
        elif name == "img" and not closing:
            images += 1
        out.append("\n" if name in _BLOCK else " ")
    if anchor is not None:
        links.append((href, " ".join("".join(anchor).split())))
    return HtmlText(_layout("".join(out)) if normalise else "".join(out), links, images)


def _layout(text: str) -> str:
    """Lines cut at the "\n" of block tags (the text's own line ends are spaces by
    now), each line's white space collapsed, at most one blank line between lines."""
    lines: list[str] = []
    blank = False
    for line in text.split("\n"):
        # str.split: any Unicode white space, the no-break space too (a space to
        # search for and to match, as in the reader's eyes)
        words = line.split()
        if not words:
            blank = bool(lines)
            continue
        if blank:
            lines.append("")
            blank = False
        lines.append(" ".join(words))
    return "\n".join(lines)


def _href(attributes: str) -> str | None:
    """The first ``href`` value among a tag's attributes (§13.2.5.33: a repeated
    attribute is ignored), decoded and stripped; None without one."""
    for m in _ATTR.finditer(attributes):
        if m.group(1).lower() == "href":
            value = m.group(2)
            if value is None:
                value = m.group(3)
            if value is None:
                value = m.group(4) or ""
            return html.unescape(value).strip()
    return None


def visible_text(markup: str) -> str:
    """The text of ``markup`` laid out as a browser shows it (``normalise=True``)."""
    return html_to_text(markup, normalise=True).text
