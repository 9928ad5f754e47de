"""The message as checks see it, and the header edits they ask for.

A check at end of data gets a :class:`MessageView`: the header fields (parsed
once, on first use, from the header section the engine collected while DATA
streamed in), the size, and the body, read by a thread of the bounded pool
from the file the sink wrote (never on the reactor).  It may answer with
:class:`HeaderEdits`: fields to add at the top and field names to remove.

The sink that holds the message applies the edits:

- the filter's queue keeps them with the envelope and applies them each time
  the message is sent from its file (:func:`HeaderEdits.prefix` and
  :class:`HeaderRemover`), so the queue file itself is never rewritten;
- the domain tier writes them into the message file before it links it into
  the mailboxes.

Added fields are always written with CRLF line ends and folded lines kept as
given, whatever the check wrote: the queue's shortcut that sends queued mail
without a second line-end pass stays safe.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet import defer

_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]{1,76}\Z")      # RFC 5322 ftext, bounded
_LINE_ENDS = re.compile(r"\r\n|\r|\n")


def _check_field(name: str, value: str) -> None:
    if not _FIELD_NAME.match(name):
        raise ValueError(f"{name!r} is not a header field name")
    for i, line in enumerate(_LINE_ENDS.split(value)):
        if i and (not line or line[0] not in " \t"):
            raise ValueError(f"header field {name}: a line break must be followed by white space "
                             f"(folding), got {value!r}")
        if "\0" in line:
            raise ValueError(f"header field {name}: NUL in value")


@dataclass(frozen=True, slots=True)
class HeaderEdits:
    """Fields to add above the message's header section, in order; names of fields to
    remove (every instance, any case); and single fields to remove (``drop``: pairs of a
    lower-case name and which of the message's fields of that name, 0 for the first, as
    :attr:`MessageView.headers` lists them): a forged Authentication-Results field goes,
    a genuine one of another host stays.  Empty edits are falsy."""
    add: tuple[tuple[str, str], ...] = ()
    remove: frozenset[str] = frozenset()
    drop: frozenset[tuple[str, int]] = frozenset()

    def __post_init__(self) -> None:
        for name, value in self.add:
            _check_field(name, value)
        object.__setattr__(self, "remove", frozenset(n.lower() for n in self.remove))
        object.__setattr__(self, "drop", frozenset((n.lower(), int(i)) for n, i in self.drop))

    def __bool__(self) -> bool:
        return bool(self.add or self.remove or self.drop)

    @property
    def removes(self) -> bool:
        """Whether the message's own header section changes (fields removed)."""
        return bool(self.remove or self.drop)

    def then(self, other: "HeaderEdits | None") -> "HeaderEdits":
        """These edits followed by `other`'s (a later check's fields go above earlier ones',
        as each new trace field goes on top)."""
        if not other:
            return self
        return HeaderEdits(add=other.add + self.add, remove=self.remove | other.remove,
                           drop=self.drop | other.drop)

    def remover(self) -> "HeaderRemover":
        return HeaderRemover(self.remove, self.drop)

    def apply(self, message: bytes) -> bytes:
        """The whole `message` with these edits made (for a check that signs what will be sent)."""
        if not self.removes:
            return self.prefix() + message
        r = self.remover()
        return self.prefix() + r.feed(message) + r.flush()

    def prefix(self) -> bytes:
        """The added fields as header lines, CRLF line ends."""
        out = []
        for name, value in self.add:
            out.append(f"{name}: " + "\r\n".join(_LINE_ENDS.split(value)) + "\r\n")
        return "".join(out).encode("utf-8")

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"add": [list(f) for f in self.add], "remove": sorted(self.remove)}
        if self.drop:
            d["drop"] = [list(f) for f in sorted(self.drop)]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> "HeaderEdits | None":
        if not d:
            return None
        return cls(add=tuple((n, v) for n, v in d.get("add", ())), remove=frozenset(d.get("remove", ())),
                   drop=frozenset((n, i) for n, i in d.get("drop", ())))


class HeaderRemover:
    """A streaming filter that drops the named fields (with their folded lines), and the
    single fields of `drop` ((name, occurrence) pairs, see :class:`HeaderEdits`), from the
    header section of a message given in chunks; the body passes untouched.

    Lines of the header section are judged whole: a chunk that ends inside a line keeps
    that line back until its end arrives (header lines are short; a line over 64 KiB
    ends the header section, as a body line would)."""

    MAX_LINE = 64 * 1024

    def __init__(self, remove: frozenset[str], drop: frozenset[tuple[str, int]] = frozenset()) -> None:
        self.remove = remove
        self.drop = drop
        self.drop_names = frozenset(n for n, _ in drop)
        self.seen: dict[str, int] = {}
        self.in_header = bool(remove or drop)
        self.dropping = False
        self.pending = b""

    def feed(self, chunk: bytes) -> bytes:
        if not self.in_header:
            return chunk
        data = self.pending + chunk
        out = bytearray()
        pos = 0
        while self.in_header:
            end = data.find(b"\n", pos)
            if end < 0:
                if len(data) - pos > self.MAX_LINE:
                    self.in_header = False
                    break
                self.pending = data[pos:]
                return bytes(out)
            line = data[pos:end + 1]
            pos = end + 1
            if line in (b"\r\n", b"\n"):
                self.in_header = False
                out += line
                break
            if line[:1] in (b" ", b"\t"):
                if not self.dropping:
                    out += line
                continue
            name = line.split(b":", 1)[0].strip().lower().decode("latin-1")
            self.dropping = name in self.remove
            if name in self.drop_names and b":" in line:
                n = self.seen.get(name, 0)
                self.seen[name] = n + 1
                self.dropping = self.dropping or (name, n) in self.drop
            if not self.dropping:
                out += line
        self.pending = b""
        out += data[pos:]
        return bytes(out)

    def flush(self) -> bytes:
        rest, self.pending = self.pending, b""
        return rest


_UNFOLD = re.compile(rb"\r?\n(?=[ \t])")


class ReadOnce:
    """`reader` (a function giving a Deferred of the message) called at most once: every
    caller gets a Deferred of the same bytes object, so the checks of one message share
    one copy of it (a failed read fails every caller waiting on it, and is tried again
    by the next)."""

    def __init__(self, reader: Callable[[], Any]) -> None:
        self.reader = reader
        self.body: bytes | None = None
        self.waiting: list[defer.Deferred] | None = None

    def __call__(self) -> defer.Deferred:
        if self.body is not None:
            return defer.succeed(self.body)
        d: defer.Deferred = defer.Deferred()
        if self.waiting is not None:
            self.waiting.append(d)
            return d
        self.waiting = [d]
        defer.maybeDeferred(self.reader).addCallbacks(self._read, self._failed)
        return d

    def _read(self, body: bytes) -> None:
        self.body = body
        waiting, self.waiting = self.waiting or [], None
        for d in waiting:
            d.callback(body)

    def _failed(self, failure) -> None:
        waiting, self.waiting = self.waiting or [], None
        for d in waiting:
            d.errback(failure)


@dataclass
class MessageView:
    """A read-only view of the message at end of data.

    ``header_section`` is what the engine collected (bounded at 256 KiB); ``headers``
    parses it once into ``(name, value)`` pairs, values unfolded and decoded as UTF-8
    (invalid bytes replaced).  ``read_body()`` gives a Deferred of the whole message
    as received (our Received field first), read off the reactor; None when the sink
    keeps no copy (the edge streams the message on and holds none).  Wrapped in
    :class:`ReadOnce`, every check that asks gets the same bytes, read once.
    """
    header_section: bytes
    size: int
    read_body: Callable[[], Any] | None = None
    _fields: tuple[tuple[str, str], ...] | None = field(default=None, repr=False)

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        if self._fields is None:
            out = []
            for raw in _UNFOLD.sub(b"", self.header_section).split(b"\n"):
                raw = raw.rstrip(b"\r")
                name, colon, value = raw.partition(b":")
                if colon and name and not name[:1].isspace():
                    out.append((name.strip().decode("utf-8", "replace"),
                                value.strip().decode("utf-8", "replace")))
            self._fields = tuple(out)
        return self._fields

    def get_all(self, name: str) -> list[str]:
        n = name.lower()
        return [v for k, v in self.headers if k.lower() == n]

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self.get_all(name)
        return values[0] if values else default
