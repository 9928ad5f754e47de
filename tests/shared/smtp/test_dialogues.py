"""Golden SMTP dialogues: tests/shared/smtp/dialogues/*.txt, each run whole, byte by byte
and in random pieces, which must all give exactly the transcript in the file.

File format, one item per line:

    # comment                      (blank lines are ignored too)
    X: key=value flag ...          session setup, before the first turn: ServerConfig fields
                                   (ints as digits), and the flags tls_available, tls_active,
                                   xclient_allowed, whole-only (skip the split runs: for
                                   dialogues whose meaning depends on what arrives together)
    C: text                        client sends text + CRLF
    R: text                        client sends text as is (no CRLF added)
    EOF                            client closes the connection
    E: Event(...)                  expected event, written as its repr(); consecutive DataChunks
                                   are merged, and dropped when the message is then aborted
    A: -                           the application answers the pending decision with the
                                   standard reply (respond(None)); or a reply line such as
    A: 550 5.1.1 User unknown      answers with that Reply
    S: line                        expected server reply line (CRLF not written)
    T: state                       expected ServerConnection.state value after the turn

C and R text may hold the escapes \\r \\n \\t \\\\ and \\xHH.  Consecutive client
lines make one *turn*: they are sent together (pipelined), then every event is
taken and answered.  The E, A, S and T lines after a turn describe that turn; the
A lines answer its decision events in order.  Lines before the first client line
describe the greeting.
"""
from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shared.smtp import events as ev
from shared.smtp.events import NEED_DATA, PAUSED
from shared.smtp.reply import Reply
from shared.smtp.server import ServerConfig, ServerConnection
from tests.shared.smtp.test_server import merge_chunks

DIALOGUES = Path(__file__).parent / "dialogues"
FLAGS = {"tls_available", "tls_active", "xclient_allowed", "whole-only"}
_ESCAPE = re.compile(r"\\(x[0-9A-Fa-f]{2}|[rnt\\])")


def unescape(text: str) -> bytes:
    out = bytearray()
    pos = 0
    for m in _ESCAPE.finditer(text):
        out += text[pos:m.start()].encode("utf-8")
        e = m.group(1)
        out += bytes([int(e[1:], 16)]) if e[0] == "x" else {"r": b"\r", "n": b"\n", "t": b"\t", "\\": b"\\"}[e]
        pos = m.end()
    out += text[pos:].encode("utf-8")
    return bytes(out)


@dataclass
class Turn:
    sends: list[bytes] = field(default_factory=list)    # b"" is EOF
    events: list[str] = field(default_factory=list)
    answers: list[Reply | None] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    state: str | None = None
    line: int = 0


@dataclass
class Dialogue:
    config: dict
    flags: set[str]
    turns: list[Turn]


def parse(path: Path) -> Dialogue:
    config: dict = {}
    flags: set[str] = set()
    turns = [Turn()]
    for n, raw in enumerate(path.read_text("utf-8").splitlines(), 1):
        if not raw.strip() or raw.startswith("#"):
            continue
        if raw == "EOF":
            kind, text = "EOF", ""
        else:
            kind, sep, text = raw.partition(": ")
            if not sep and raw in ("C:", "R:"):
                kind, text = raw[:1], ""
            elif not sep:
                raise ValueError(f"{path.name}:{n}: bad line {raw!r}")
        turn = turns[-1]
        if kind in ("C", "R", "EOF"):
            if len(turns) == 1 or turn.events or turn.answers or turn.replies or turn.state is not None:
                turn = Turn(line=n)
                turns.append(turn)
            data = b"" if kind == "EOF" else unescape(text) + (b"\r\n" if kind == "C" else b"")
            if data and turn.sends and turn.sends[-1]:
                turn.sends[-1] += data          # one turn's lines are sent together
            else:
                turn.sends.append(data)
        elif kind == "X":
            for item in text.split():
                key, eq, value = item.partition("=")
                if not eq:
                    assert key in FLAGS, f"{path.name}:{n}: unknown flag {key}"
                    flags.add(key)
                else:
                    config[key] = int(value) if value.isdigit() else value
        elif kind == "E":
            turn.events.append(text)
        elif kind == "A":
            turn.answers.append(None if text == "-" else Reply.parse_lines([text.encode()]))
        elif kind == "S":
            turn.replies.append(text)
        elif kind == "T":
            turn.state = text
        else:
            raise ValueError(f"{path.name}:{n}: unknown line kind {kind!r}")
    return Dialogue(config, flags, turns)


def pieces(data: bytes, mode: str, rng: random.Random) -> list[bytes]:
    if not data:
        return [b""]
    if mode == "whole":
        return [data]
    if mode == "bytes":
        return [data[i:i + 1] for i in range(len(data))]
    out, i = [], 0
    while i < len(data):
        n = rng.randint(1, 12)
        out.append(data[i:i + n])
        i += n
    return out


def run(dialogue: Dialogue, mode: str, name: str) -> None:
    rng = random.Random(zlib.crc32(name.encode()))
    conn = ServerConnection(ServerConfig(**{"hostname": "mx.test", **dialogue.config}),
                            tls_available="tls_available" in dialogue.flags,
                            tls_active="tls_active" in dialogue.flags,
                            xclient_allowed="xclient_allowed" in dialogue.flags)
    conn.send_greeting()
    for turn in dialogue.turns:
        where = f"{name} turn at line {turn.line} ({mode})"
        answers = list(turn.answers)
        seen: list[ev.Event] = []

        def pump() -> None:
            while True:
                event = conn.next_event()
                if event is NEED_DATA or event is PAUSED:
                    return
                seen.append(event)
                if isinstance(event, ev.StartTLS):
                    conn.tls_started()
                if event.needs_reply:
                    assert answers, f"{where}: no A: line left for {event!r}"
                    conn.respond(answers.pop(0))

        pump()
        for data in turn.sends:
            for piece in pieces(data, mode, rng):
                conn.receive_data(piece)
                pump()
        assert not answers, f"{where}: unused A: lines {answers}"
        assert [repr(e) for e in merge_chunks(seen)] == turn.events, where
        out = conn.data_to_send().decode("utf-8")
        assert out.split("\r\n")[:-1] == turn.replies, where
        if turn.state is not None:
            assert conn.state.value == turn.state, where


FILES = sorted(DIALOGUES.glob("*.txt"))
CASES = [pytest.param(path, mode, id=f"{path.stem}-{mode}")
         for path in FILES for mode in ("whole", "bytes", "random")
         if mode == "whole" or "whole-only" not in parse(path).flags]


def test_there_are_enough_dialogues():
    assert len(FILES) >= 15


@pytest.mark.parametrize("path, mode", CASES)
def test_dialogue(path, mode):
    run(parse(path), mode, path.name)


def test_harness_notices_a_wrong_transcript(tmp_path):
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("S: 220 mx.test ESMTP\nC: NOOP\nS: 250 2.0.0 Not ok\n")
    with pytest.raises(AssertionError):
        run(parse(wrong), "whole", "wrong.txt")
    missing_answer = tmp_path / "missing.txt"
    missing_answer.write_text("S: 220 mx.test ESMTP\nC: EHLO x\nE: Hello(verb='EHLO', domain='x')\n")
    with pytest.raises(AssertionError):
        run(parse(missing_answer), "whole", "missing.txt")


def test_unescape():
    assert unescape(r"a\r\nb\\c\td") == b"a\r\nb\\c\td"
    assert unescape(r"\x00\xff") == b"\x00\xff"
    assert unescape("ö") == "ö".encode()
