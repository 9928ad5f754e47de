"""The benchmark's SMTP sink: the next hop of the single-hop comparison.

    python -m bench.sink --port P --dir DIR [--threads 4]

Accepts any envelope and answers 250 to end of data only after the message is
written to its own file in DIR (O_EXCL, named by a counter) and the file is
fsynced -- the same durability promise the systems under test make, so
neither gets a sink that acknowledges from memory.  Writes and fsyncs run in
a thread pool; replies stay in order because a session reads no further
command until its end-of-data reply is sent.  Offers PIPELINING, 8BITMIME and
ENHANCEDSTATUSCODES; the DATA scan looks for CRLF.CRLF with bytes.find, the
message is stored as received (still dot-stuffed).

Trusts its clients (benchmark loopback only); it checks no syntax beyond the
command verb.  Prints "listening" on stdout once bound; SIGTERM stops it.
:func:`spawn` starts it as a child of a benchmark, :func:`stats` asks it XSTATS.

``XSTATS`` (for the benchmark, never offered in EHLO) answers
``250 stored=N last=T``: messages stored so far and the CLOCK_MONOTONIC time
of the last one, which tells when a queueing relay finished delivering.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

TERMINATOR = b"\r\n.\r\n"
EHLO = (b"250-sink.example.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
        b"250 ENHANCEDSTATUSCODES\r\n")
REPLIES = {
    b"HELO": b"250 sink.example.test\r\n",
    b"MAIL": b"250 2.1.0 Ok\r\n",
    b"RCPT": b"250 2.1.5 Ok\r\n",
    b"RSET": b"250 2.0.0 Ok\r\n",
    b"NOOP": b"250 2.0.0 Ok\r\n",
}


def store(path: str, chunks: list[bytes]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.writev(fd, chunks) if len(chunks) < 1000 else os.write(fd, b"".join(chunks))
        os.fsync(fd)
    finally:
        os.close(fd)


class Sink:
    def __init__(self, directory: str, threads: int) -> None:
        self.directory = directory
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sink-fsync")
        self.counter = itertools.count()
        self.prefix = f"{os.getpid()}."
        self.stored = 0
        self.last_stored = 0.0       # CLOCK_MONOTONIC of the last 250 to end of data


class SinkProtocol(asyncio.Protocol):
    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.buf = b""
        self.in_data = False
        self.chunks: list[bytes] = []
        self.tail = b""
        self.rcpts = 0
        self.busy = False            # an end-of-data reply is pending: read no further command
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(b"220 sink.example.test ESMTP bench sink\r\n")

    def data_received(self, data: bytes) -> None:
        if self.in_data:
            self._data(data)
        else:
            self.buf += data
            self._commands()

    def _data(self, chunk: bytes) -> None:
        boundary = (self.tail + chunk[:4]).find(TERMINATOR)
        if boundary >= 0:
            end = boundary + 5 - len(self.tail)
        else:
            end = chunk.find(TERMINATOR)
            if end >= 0:
                end += 5
        if end < 0:
            self.chunks.append(chunk)
            self.tail = (self.tail + chunk)[-4:] if len(chunk) < 4 else chunk[-4:]
            return
        self.chunks.append(chunk[:end])
        self.buf += chunk[end:]
        self.in_data = False
        chunks, self.chunks = self.chunks, []
        self.busy = True
        self.transport.pause_reading()
        path = os.path.join(self.sink.directory, f"{self.sink.prefix}{next(self.sink.counter)}")
        future = asyncio.get_running_loop().run_in_executor(self.sink.pool, store, path, chunks)
        future.add_done_callback(self._stored)

    def _stored(self, future) -> None:
        if self.transport.is_closing():
            return
        if future.exception() is not None:
            self.transport.write(b"451 4.3.0 Cannot store the message\r\n")
        else:
            self.sink.stored += 1
            self.sink.last_stored = time.monotonic()
            self.transport.write(b"250 2.0.0 Ok: stored\r\n")
        self.rcpts = 0
        self.busy = False
        self.transport.resume_reading()
        self._commands()

    def _commands(self) -> None:
        while not self.busy and not self.in_data:
            end = self.buf.find(b"\n")
            if end < 0:
                if len(self.buf) > 4096:
                    self.transport.write(b"500 5.5.2 Line too long\r\n")
                    self.transport.close()
                return
            line, self.buf = self.buf[:end + 1], self.buf[end + 1:]
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.transport.write(EHLO)
            elif verb == b"RCPT":
                self.rcpts += 1
                self.transport.write(REPLIES[verb])
            elif verb in REPLIES:
                if verb in (b"MAIL", b"RSET", b"HELO"):
                    self.rcpts = 0
                self.transport.write(REPLIES[verb])
            elif verb == b"DATA":
                if not self.rcpts:
                    self.transport.write(b"554 5.5.1 No valid recipients\r\n")
                    continue
                self.transport.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                self.in_data = True
                self.tail = b"\r\n"           # the CRLF that ended the DATA command
                rest, self.buf = self.buf, b""
                if rest:
                    self._data(rest)
            elif line[:6].upper() == b"XSTATS":
                self.transport.write(b"250 stored=%d last=%.6f\r\n" % (self.sink.stored, self.sink.last_stored))
            elif verb == b"QUIT":
                self.transport.write(b"221 2.0.0 Bye\r\n")
                self.transport.close()
                return
            else:
                self.transport.write(b"502 5.5.2 Command not implemented\r\n")


async def serve(port: int, directory: str, threads: int, host: str = "127.0.0.1") -> None:
    os.makedirs(directory, exist_ok=True)
    sink = Sink(directory, threads)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SinkProtocol(sink), host, port, backlog=1024,
                                      reuse_address=True)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    print(f"listening on {host}:{port}", flush=True)
    await stop
    server.close()
    sink.pool.shutdown(wait=True)


def spawn(port: int, directory) -> subprocess.Popen:
    """The sink as a child process of the caller, once it listens (stop it with
    bench.smarthost.stop_process)."""
    from bench.smarthost import REPO, repo_env
    os.makedirs(directory, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "bench.sink", "--port", str(port), "--dir", str(directory)],
                            cwd=REPO, env=repo_env(), stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    line = proc.stdout.readline()
    if not line.startswith("listening"):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"sink did not start: {line!r}")
    return proc


def stats(port: int) -> dict:
    """{"stored": messages stored so far, "last": CLOCK_MONOTONIC of the last one}."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"XSTATS\r\nQUIT\r\n")
        line = f.readline().decode()
        f.readline()
    fields = dict(kv.split("=") for kv in line.split()[1:])
    return {"stored": int(fields["stored"]), "last": float(fields["last"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sink", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--dir", required=True, help="directory the messages are written to")
    p.add_argument("--threads", type=int, default=4, help="threads that write and fsync")
    a = p.parse_args(argv)
    asyncio.run(serve(a.port, a.dir, a.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
