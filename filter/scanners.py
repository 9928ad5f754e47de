"""Outside spam scanners at end of data: SpamAssassin's spamd (the check ``spamd``) and
rspamd (the check ``rspamd``).  Each is off unless its ``servers`` are set.

- spamd: ``SYMBOLS SPAMC/1.5`` with ``Content-length`` and ``User``, then the message as
  received (our Received field first); the answer ``SPAMD/1.1 0 EX_OK``, ``Spam: True ;
  15.0 / 5.0`` and the names of the rules that hit.  Another EX_ code, or anything else, is
  a failure of that server.
- rspamd: ``POST /checkv2`` to its normal worker (HTTP/1.1, ``Connection: close``) with the
  envelope as headers (``IP`` the original client, ``Helo``, ``From``, one ``Rcpt`` per
  recipient, ``Queue-Id``, ``User`` the AUTH login, ``Hostname``, ``Password`` when set)
  and the message as the body; the JSON answer's ``score``, ``required_score``, ``action``
  and ``symbols``.  Any status but 200, or a body without a numeric score, is a failure.

The scanner's score is folded into ours as one symbol, SPAMD or RSPAMD, whose factor is the
scanner's score: ``[actions] scores = { SPAMD = 0.5 }`` counts half of what spamd says (the
default, 1.0, counts it all).  Its detail is the scanner's rules (rspamd's with their
scores); the message's log line says ``spamd=7.3/5 (RULE,...)``.  rspamd's own ``action``
decides only with ``[rspamd] use_action = true``: "reject" is then 550 5.7.1 and "soft
reject" 451 4.7.1 whatever our score.

- A message over ``max_size`` is not sent (spamc's own limit is 500 KB): logged, symbol
  SPAMD_SKIPPED / RSPAMD_SKIPPED, accepted.
- Down (connection refused), slow (``timeout`` per server) or answering garbage: the next
  of ``servers``; when none answers, ``on_failure``: ``accept`` (the default: a spam
  scanner's outage should not stop the mail our own checks already score, what Postfix's
  ``milter_default_action = accept`` says for such a milter; logged, symbol SPAMD_FAIL /
  RSPAMD_FAIL) or ``tempfail`` (451 4.7.1, the client retries).  Never a traceback to the
  client: a bug in this code is the chain's 451.

Sends the message and its envelope (rspamd: with the password) to the configured servers
only, in the clear: put them on a trusted network or a local socket.  Trusts their answer
as a score (and, with use_action, a verdict), nothing else: no header of theirs is copied.
The clients are :mod:`filter.scanclient` protocols on the reactor, no thread.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from twisted.logger import Logger

from filter.scanclient import Exchange, ScannerError, Servers, server_setting, server_text
from shared.checks.core import Request, Symbol, Verdict, note, reject, tempfail
from shared.checks.registry import CheckType
from shared.config.schema import SECONDS, Section, bounded, choice, setting

log = Logger(namespace="smarthost.scanners")

MIB = 1024 * 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SPAM_LINE = re.compile(r"\s*(true|false|yes|no)\s*;\s*(-?[0-9.]+)\s*/\s*(-?[0-9.]+)\s*\Z", re.I)


def _servers(what: str, default_port: int):
    return setting((), f"{what} servers, host:port (its port is usually {default_port}) or the absolute path of "
                       f"its local socket, tried in turn (empty: not used)", server_setting)


def _timeout(what: str):
    return setting(30.0, f"seconds one {what} server may take for one message, then the next is tried", SECONDS)


def _on_failure(symbol: str):
    return setting("accept", f"no server answered: accept (fail open: logged, symbol {symbol}) or tempfail "
                             "(451 4.7.1: the client retries)", choice("accept", "tempfail"))


@dataclass(frozen=True)
class SpamdSettings:
    """SpamAssassin's spamd at end of data (the check `spamd`)"""
    servers: tuple = _servers("spamd", 783)
    timeout: float = _timeout("spamd")
    max_size: int = setting(500 * 1024, "messages larger than this are not sent (symbol SPAMD_SKIPPED); spamc's "
                                        "own default is 500 KB", bounded(1, 1 << 40))
    on_failure: str = _on_failure("SPAMD_FAIL")
    user: str = setting("", "the User spamd scans for (its per-user settings; empty: spamd's own user)")


@dataclass(frozen=True)
class RspamdSettings:
    """rspamd's normal worker at end of data (the check `rspamd`)"""
    servers: tuple = _servers("rspamd normal worker", 11333)
    timeout: float = _timeout("rspamd")
    max_size: int = setting(50 * MIB, "messages larger than this are not sent (symbol RSPAMD_SKIPPED); rspamd's "
                                      "own max_message is 50 MB", bounded(1, 1 << 40))
    on_failure: str = _on_failure("RSPAMD_FAIL")
    password: str = setting("", "sent as the Password header (empty: none); in the clear", secret=True)
    use_action: bool = setting(False, "rspamd's own action decides too: reject is 550 5.7.1, soft reject 451 "
                                      "4.7.1 (false: only its score counts, in ours)")


@dataclass(frozen=True, slots=True)
class ScanResult:
    scanner: str                # spamd | rspamd
    result: str                 # scanned | skipped | unavailable
    score: float = 0.0
    required: float = 0.0
    rules: tuple[tuple[str, float | None], ...] = ()    # (name, its score where the scanner says it)
    action: str = ""            # rspamd's
    detail: str = ""            # why skipped or unavailable

    @property
    def rules_text(self) -> str:
        return ",".join(n if s is None else f"{n}({s:g})" for n, s in self.rules)

    @property
    def log(self) -> str:
        if self.result != "scanned":
            return f"{self.scanner}={self.result}" + (f" ({self.detail})" if self.detail else "")
        rules = self.rules_text
        return f"{self.scanner}={self.score:g}/{self.required:g}" + (f" ({rules[:300]})" if rules else "")


def _finite(score: float, what: str) -> float:
    """A score that can count in ours (JSON allows NaN and Infinity; a sum with them decides nothing)."""
    if not math.isfinite(score):
        raise ScannerError(f"{what} answered the score {score}")
    return score


def _header_value(value) -> str:
    return _CONTROL.sub("", str(value))[:998]


class _Headed(Exchange):
    """An answer of header lines, an empty line and a body of Content-length octets (spamd's
    and HTTP's); whole at that length (closed before it: no answer), or, without a length,
    when the server closes the connection."""

    def complete(self, buf: bytes, closed: bool) -> bytes | None:
        head, sep, body = buf.partition(b"\r\n\r\n")
        m = re.search(rb"^content-length:[ \t]*(\d+)[ \t]*\r?$", head, re.I | re.M) if sep else None
        if m:
            return buf if len(body) >= int(m.group(1)) else None     # cut short: no answer
        return buf if closed else None


# -- spamd ------------------------------------------------------------------------------------

class _Spamc(_Headed):
    """SYMBOLS SPAMC/1.5: the request line and headers, then the message itself."""

    max_answer = 64 * 1024

    def __init__(self, message: bytes, user: str, answered) -> None:
        head = f"SYMBOLS SPAMC/1.5\r\nContent-length: {len(message)}\r\n"
        if user:
            head += f"User: {_header_value(user)}\r\n"
        super().__init__([(head + "\r\n").encode("ascii", "replace"), message], answered)



def parse_spamd(answer: bytes) -> ScanResult:
    """spamd's answer to SYMBOLS; raises ScannerError for an error code or garbage."""
    text = answer.decode("utf-8", "replace")
    head, sep, body = text.partition("\r\n\r\n")
    lines = head.split("\r\n")
    status = lines[0].split(None, 2)
    if len(status) < 2 or not status[0].startswith("SPAMD/"):
        raise ScannerError(f"spamd answered {lines[0][:100]!r}")
    if status[1] != "0":
        raise ScannerError(f"spamd answered {lines[0][:100]!r}")
    spam = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "spam":
            spam = _SPAM_LINE.match(value)
    if spam is None or not sep:
        raise ScannerError(f"spamd's answer has no Spam line ({head[:100]!r})")
    try:
        score, required = float(spam.group(2)), float(spam.group(3))
    except ValueError:
        raise ScannerError(f"spamd's Spam line is not a score: {spam.group(0)!r}") from None
    rules = tuple((r, None) for r in (x.strip() for x in body.strip().split(",")) if re.fullmatch(r"[\w.-]{1,64}", r))
    return ScanResult("spamd", "scanned", _finite(score, "spamd"), required, rules)


# -- rspamd -----------------------------------------------------------------------------------

class _CheckV2(_Headed):
    """POST /checkv2: the envelope as headers, the message as the body; the HTTP answer."""

    max_answer = 1 << 20

    def __init__(self, head: bytes, message: bytes, answered) -> None:
        super().__init__([head, message], answered)


def checkv2_head(request: Request, size: int, host: str, password: str = "") -> bytes:
    """The request line and headers of rspamd's /checkv2 for `request`'s transaction."""
    fields = [("Host", host), ("Content-Length", size), ("Connection", "close"),
              ("IP", request.client_address), ("Helo", request.helo), ("From", request.sender or "<>"),
              *(("Rcpt", r) for r in request.recipients), ("Queue-Id", request.queue_id),
              ("User", request.login), ("Hostname", request.client_name), ("Password", password or None)]
    lines = ["POST /checkv2 HTTP/1.1"] + [f"{n}: {_header_value(v)}" for n, v in fields if v not in (None, "")]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "replace")


def _dechunk(body: bytes) -> bytes:
    out, rest = [], body
    while True:
        size, sep, rest = rest.partition(b"\r\n")
        if not sep:
            raise ScannerError("rspamd's chunked answer is cut short")
        n = int(size.split(b";")[0], 16)
        if n == 0:
            return b"".join(out)
        out.append(rest[:n])
        rest = rest[n + 2:]


def parse_rspamd(answer: bytes) -> ScanResult:
    """rspamd's HTTP answer to /checkv2; raises ScannerError for an error status or garbage."""
    head, sep, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(None, 2)
    if len(status) < 2 or not status[0].startswith("HTTP/") or not sep:
        raise ScannerError(f"rspamd answered {lines[0][:100]!r}")
    if status[1] != "200":
        raise ScannerError(f"rspamd answered HTTP {' '.join(status[1:])[:100]}: {body[:100]!r}")
    if any(re.fullmatch(r"transfer-encoding:\s*chunked\s*", x, re.I) for x in lines[1:]):
        try:
            body = _dechunk(body)
        except ValueError:
            raise ScannerError("rspamd's chunked answer is garbled") from None
    try:
        reply = json.loads(body)
        score, required = float(reply["score"]), float(reply.get("required_score", 0.0))
        symbols = reply.get("symbols") or {}
        rules = sorted(((str(name), round(float(s.get("score", 0.0)), 2)) for name, s in symbols.items()),
                       key=lambda r: (-abs(r[1]), r[0]))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ScannerError(f"rspamd's answer is not its JSON reply ({e.__class__.__name__}: {body[:100]!r})") from None
    return ScanResult("rspamd", "scanned", _finite(score, "rspamd"), required, tuple(rules),
                      str(reply.get("action", ""))[:40])


# -- the checks -------------------------------------------------------------------------------

class _Scanner:
    """What spamd and rspamd share: the size cap, the servers in turn, the failure mode."""
    name = ""
    symbol = ""                 # SPAMD | RSPAMD: its score folded into ours

    def __init__(self, own, reactor) -> None:
        self.own = own
        self.servers = Servers(reactor, own.servers, own.timeout, self.name)

    def exchange(self, request: Request, message: bytes, server, answered) -> Exchange:
        raise NotImplementedError

    def parse(self, answer: bytes) -> ScanResult:
        raise NotImplementedError

    def __call__(self, request: Request):
        message = request.message
        if message is None or message.read_body is None:
            return note()
        if message.size > self.own.max_size:
            why = f"{message.size} octets, over {self.own.max_size}"
            log.info("{what}: message not scanned: {why}", what=self.name, why=why)
            return note(ScanResult(self.name, "skipped", detail=why), symbols=(Symbol(f"{self.symbol}_SKIPPED", why),))
        d = message.read_body()
        d.addCallback(lambda body: self._scan(request, body))
        return d.addCallbacks(self._verdict, self._failed)

    def _scan(self, request: Request, body: bytes):
        return self.servers.first(lambda server, answered: self.exchange(request, body, server, answered), self.parse)

    def _verdict(self, result: ScanResult) -> Verdict:
        symbols = (Symbol(self.symbol, result.rules_text[:500], factor=result.score),)
        return note(result, symbols=symbols)

    def _failed(self, failure) -> Verdict:
        failure.trap(ScannerError)
        why = str(failure.value)
        result = ScanResult(self.name, "unavailable", detail=why[:300])
        log.error("{what}: no server answered ({why}); {then}", what=self.name, why=why,
                  then="tempfail" if self.own.on_failure == "tempfail" else "accepted unscanned (on_failure = accept)")
        if self.own.on_failure == "accept":
            return note(result, symbols=(Symbol(f"{self.symbol}_FAIL", why[:100]),))
        v = tempfail(451, "4.7.1", "Spam scanner unavailable: try again later")
        return Verdict(v.action, v.reply, result=result)


class Spamd(_Scanner):
    name = "spamd"
    symbol = "SPAMD"

    def exchange(self, request: Request, message: bytes, server, answered) -> Exchange:
        return _Spamc(message, self.own.user, answered)

    def parse(self, answer: bytes) -> ScanResult:
        return parse_spamd(answer)


class Rspamd(_Scanner):
    name = "rspamd"
    symbol = "RSPAMD"

    def exchange(self, request: Request, message: bytes, server, answered) -> Exchange:
        host = "localhost" if isinstance(server, str) else server_text(server)
        return _CheckV2(checkv2_head(request, len(message), host, self.own.password), message, answered)

    def parse(self, answer: bytes) -> ScanResult:
        return parse_rspamd(answer)

    def _verdict(self, result: ScanResult) -> Verdict:
        verdict = super()._verdict(result)
        if not self.own.use_action or result.action not in ("reject", "soft reject"):
            return verdict
        if result.action == "reject":
            v = reject(550, "5.7.1", "Message refused as spam")
        else:
            v = tempfail(451, "4.7.1", "Message deferred by the spam scanner: try again later")
        return Verdict(v.action, v.reply, result=result, symbols=verdict.symbols)


def _build(kind):
    def build(own, ctx):
        return kind(own, ctx.reactor) if own.servers else None
    return build


def _summary(what: str):
    return lambda own, s: f"{what}: " + ", ".join(server_text(x) for x in own.servers) + \
        f", timeout {own.timeout:g}s, max_size {own.max_size}, on_failure {own.on_failure}"


def _symbols(name: str, what: str) -> dict[str, tuple[float, str]]:
    return {name: (1.0, f"{what}'s own score, times this (1.0: all of it; 0.5: half)"),
            f"{name}_SKIPPED": (0.0, f"not sent to {what}: over max_size"),
            f"{name}_FAIL": (0.0, f"no {what} answered and on_failure = accept: not scanned")}


def _check_type(name: str, kind: type, settings: type, how: str) -> CheckType:
    return CheckType(
        name, phases=("end_of_data",), build=_build(kind), section=Section.of(name, settings),
        timeout=lambda s: getattr(s, name).timeout * max(1, len(getattr(s, name).servers)) + 5,
        active=lambda own, s: bool(own.servers),
        doc=f"hand the message to {how}; its score counts in ours ({kind.symbol})",
        summary=_summary(name), symbols=_symbols(kind.symbol, name))


SPAMD = _check_type("spamd", Spamd, SpamdSettings, "SpamAssassin's spamd (SYMBOLS)")
RSPAMD = _check_type("rspamd", Rspamd, RspamdSettings, "rspamd (POST /checkv2)")
