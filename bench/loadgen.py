"""
A small, fast HTTP/1.1 load generator for bench/run.py (one worker process).

It is run by run.py, never by hand:

    python bench/loadgen.py            # reads one JSON spec line on stdin

It drives one target, or several (C{targets}: several gateways, each
connection to one of them in turn), and reports them as one.

The protocol with the parent, one line each way at a time:

1. parent -> worker: the spec, a JSON object (see L{main});
2. worker -> parent: C{ready} once its keep-alive connections are open;
3. parent -> worker: C{go START DEADLINE HARD_STOP} (C{time.monotonic()}
   values, comparable across processes on Linux);
4. parent -> worker, optionally: C{stop} (abort now, as at HARD_STOP);
5. worker -> parent: C{result {...json...}}.

Each connection sends the same request again and again, back to back
(a closed loop; with C{think}, that many seconds apart), from START until
DEADLINE; no request starts after DEADLINE, and whatever is still running
at HARD_STOP is aborted and counted as an error.  Per request it records
the latency (request written to response complete) and the time to first
token:

- C{plain}: no first token, only the latency;
- C{ndjson}: the first complete NDJSON line of the body (Ollama's stream);
- C{sse}: the first SSE C{data:} event carrying a non-empty C{content}
  (the OpenAI stream).

It uses asyncio protocols (no streams, no per-request tasks) and parses
the response framing by hand (Content-Length or chunked), so that one
worker can keep up with far more than one Python gateway can send.
"""

import asyncio
import json
import re
import socket
import sys
import time

PLAIN, NDJSON, SSE = "plain", "ndjson", "sse"

_SSE_CONTENT = re.compile(rb'data: ?\{[^\n]*?"content": ?"[^"]')

# Streamed chunks received (all connections of this worker): NDJSON lines,
# or SSE events carrying a JSON object (C{[DONE]} is not a chunk).
CHUNKS = [0]
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)")

# parser states
_IDLE, _HEAD, _LENGTH, _EOF, _SIZE, _DATA, _CRLF, _TRAILER = range(8)


class Client(asyncio.Protocol):
    """One keep-alive connection; L{send} returns a future of the result."""

    def __init__(self, loop, mode, opened):
        self.loop = loop
        self.mode = mode
        self.opened = opened  # the worker's set of open clients
        self.transport = None
        self.closed = False
        self.waiter = None
        self.state = _IDLE
        self.buf = b""

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.opened.add(self)

    def connection_lost(self, exc):
        self.closed = True
        self.opened.discard(self)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            if self.state == _EOF:
                self._done(time.monotonic())
            else:
                waiter.set_exception(ConnectionError("connection closed mid-response"))

    def data_received(self, data):
        waiter = self.waiter
        if waiter is None or waiter.done():
            return  # nothing was asked for: ignore
        now = time.monotonic()
        buf = self.buf + data if self.buf else data
        pos = 0
        end = len(buf)
        state = self.state
        try:
            if state == _HEAD:
                i = buf.find(b"\r\n\r\n")
                if i < 0:
                    self.buf = buf
                    return
                head = buf[:i].lower()
                self.status = int(head[9:12])
                self.keep_alive = b"\r\nconnection: close" not in head
                pos = i + 4
                if b"\r\ntransfer-encoding: chunked" in head:
                    state = _SIZE
                else:
                    m = _CONTENT_LENGTH.search(head)
                    if m:
                        self.remaining = int(m.group(1))
                        state = _LENGTH
                        if self.remaining == 0:
                            self.state = _IDLE
                            self.buf = b""
                            self._done(now)
                            return
                    else:
                        state = _EOF
                        self.keep_alive = False
            if state == _LENGTH or state == _EOF:
                piece = buf[pos:] if pos else buf
                if state == _LENGTH:
                    piece = piece[: self.remaining]
                    self.remaining -= len(piece)
                if piece:
                    self._body(piece, now)
                if state == _LENGTH and self.remaining == 0:
                    self.state = _IDLE
                    self.buf = b""
                    self._done(now)
                    return
                self.state = state
                self.buf = b""
                return
            while pos < end:
                if state == _SIZE:
                    j = buf.find(b"\r\n", pos)
                    if j < 0:
                        break
                    size = int(buf[pos:j].split(b";", 1)[0], 16)
                    pos = j + 2
                    if size:
                        self.remaining = size
                        state = _DATA
                    else:
                        state = _TRAILER
                elif state == _DATA:
                    take = min(self.remaining, end - pos)
                    self._body(buf[pos : pos + take], now)
                    pos += take
                    self.remaining -= take
                    if not self.remaining:
                        state = _CRLF
                elif state == _CRLF:
                    if end - pos < 2:
                        break
                    pos += 2
                    state = _SIZE
                else:  # _TRAILER
                    j = buf.find(b"\r\n", pos)
                    if j < 0:
                        break
                    trailer = j == pos
                    pos = j + 2
                    if trailer:
                        self.state = _IDLE
                        self.buf = b""
                        self._done(now)
                        return
            self.state = state
            self.buf = buf[pos:] if pos < end else b""
        except ValueError:
            self.state = _IDLE
            waiter.set_exception(ConnectionError("unparsable response"))
            self.transport.abort()

    # -- requests -----------------------------------------------------------

    def send(self, request):
        self.waiter = waiter = self.loop.create_future()
        self.state = _HEAD
        self.buf = b""
        self.status = 0
        self.first = None
        self.error = False
        self.scan = b""
        self.transport.write(request)
        return waiter

    def _body(self, piece, now):
        if self.mode == PLAIN:
            return
        CHUNKS[0] += piece.count(b"\n") if self.mode == NDJSON else piece.count(b"data: {")
        if b'{"error"' in piece:
            self.error = True
        if self.first is None:
            if self.mode == NDJSON:
                if b"\n" in piece:
                    self.first = now
            else:
                self.scan += piece
                if _SSE_CONTENT.search(self.scan):
                    self.first = now
                    self.scan = b""

    def _done(self, now):
        self.waiter.set_result((self.status, self.first if self.first is not None else now, now, self.error))

    def abort(self):
        if self.transport is not None:
            self.transport.abort()


async def run(spec, control):
    loop = asyncio.get_running_loop()
    mode = spec["mode"]
    # Where each connection goes: with C{targets}, connection i of all the
    # workers' connections to target i mod their number (round-robin, so
    # that several gateways get equal shares across workers too).
    targets = [
        (t["host"], t["port"], t["request"].encode("latin-1"))
        for t in spec.get("targets") or [{"host": spec["host"], "port": spec["port"], "request": spec["request"]}]
    ]
    index0, total = spec.get("index0", 0), spec.get("total", spec["connections"])
    opened = set()
    gate = asyncio.Semaphore(spec.get("connect_parallel", 64))
    errors = {}
    latencies, ttfts = [], []
    state = {"completed": 0, "last_end": 0.0, "first_start": None, "stopping": False}

    def error(kind):
        errors[kind] = errors.get(kind, 0) + 1

    def target(index):
        return targets[(index0 + index) % len(targets)]

    async def connect(index):
        host, port, _ = target(index)
        async with gate:
            _, client = await loop.create_connection(lambda: Client(loop, mode, opened), host, port)
        return client

    async def connect_or_none(index):
        try:
            return await connect(index)
        except OSError as e:
            error(f"connect: {type(e).__name__}")
            return None

    clients = await asyncio.gather(*[connect_or_none(i) for i in range(spec["connections"])])
    connected = sum(c is not None for c in clients)
    print("ready", flush=True)
    go = (await control.readline()).split()
    start, deadline, hard_stop = (float(x) for x in go[1:4])

    def stop_all():
        state["stopping"] = True
        for client in list(opened):
            client.abort()

    loop.call_at(hard_stop, stop_all)  # loop.time() is time.monotonic()

    async def stop_when_told():
        # C{stop}: the parent's other client is done, so end now.
        if (await control.readline()).strip() == b"stop":
            stop_all()

    stopper = asyncio.ensure_future(stop_when_told())
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    cpu0 = time.process_time()
    CHUNKS[0] = 0

    per_connection = []
    stagger = spec.get("stagger", 0.0)
    think = spec.get("think", 0.0)

    async def drive(index, client):
        # Connection i of n starts i/n of the way into the stagger window,
        # so that streams do not all begin (and end) in lockstep.
        if stagger:
            await asyncio.sleep(max(0.0, start + stagger * (index0 + index) / total - time.monotonic()))
        request = target(index)[2]
        mine = [0, None, None]  # completed, first start, last end
        per_connection.append(mine)
        while True:
            if time.monotonic() >= deadline or state["stopping"]:
                if client is not None:
                    client.transport.close()
                return
            if client is None or client.closed:
                client = await connect_or_none(index)
                if client is None:
                    await asyncio.sleep(0.01)
                    continue
            t0 = time.monotonic()
            if mine[1] is None:
                mine[1] = t0
            try:
                status, first, t_end, stream_error = await client.send(request)
            except ConnectionError as e:
                error("aborted at hard stop" if state["stopping"] else f"connection: {e}")
                client = None
                continue
            if status != 200:
                error(f"HTTP {status}")
                await asyncio.sleep(0.001)
            elif stream_error:
                error("error in stream")
            else:
                latencies.append(t_end - t0)
                ttfts.append(first - t0)
                state["completed"] += 1
                mine[0] += 1
                mine[2] = t_end
                if t_end > state["last_end"]:
                    state["last_end"] = t_end
            if not client.keep_alive:
                client.transport.close()
                client = None
            if think:
                await asyncio.sleep(think)

    await asyncio.gather(*[drive(i, c) for i, c in enumerate(clients)])
    stopper.cancel()
    cpu = time.process_time() - cpu0
    return {
        "connected": connected,
        "completed": state["completed"],
        "start": start,
        "last_end": state["last_end"],
        "latency_us": [round(x * 1e6) for x in latencies],
        "ttft_us": [round(x * 1e6) for x in ttfts],
        "errors": errors,
        "cpu": cpu,
        "chunks": CHUNKS[0],
        "per_connection": [m for m in per_connection if m[0]],
    }


async def main_async():
    loop = asyncio.get_running_loop()
    control = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(control), sys.stdin)
    spec = json.loads(await control.readline())
    result = await run(spec, control)
    sys.stdout.write("result " + json.dumps(result, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def main():
    """
    The spec: C{host}, C{port}, C{request} (the raw HTTP/1.1 request, as a
    latin-1 string), C{mode} (C{plain}, C{ndjson} or C{sse}),
    C{connections}, and optionally C{targets} (a list of C{host}, C{port}
    and C{request} objects: then connection i of all the workers'
    connections goes to target i mod their number, and C{host}, C{port} and
    C{request} are not used), C{connect_parallel} (how many connects
    at once, so a thousand connections do not overflow a listen backlog),
    C{stagger} (seconds over which the connections' first requests are
    spread), C{index0} and C{total} (this worker's first connection index
    and the connections of all workers, for the stagger), and C{think}
    (seconds each connection waits after a request before its next one, as
    a person reading the answer does).
    """
    asyncio.run(main_async())


if __name__ == "__main__":
    main()
