"""The HTTP side of bench/bench_generation.py: raw asyncio keep-alive clients sending
POST /generate back to back (JSON or server-sent events), counting the tokens each
answer reports and, for streams, the time to the first `data:` event."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from bench_serving import CORES, HOST


@dataclass
class Run:
    """One setting's measurement; two halves of it add up to one."""

    tokens: int = 0
    requests: int = 0
    seconds: float = 0.0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)  # per request, s
    first_token: list[float] = field(default_factory=list)  # streamed only, s
    client_cpu_s: float = 0.0

    def __add__(self, other: Run) -> Run:
        return Run(self.tokens + other.tokens, self.requests + other.requests,
                   self.seconds + other.seconds, self.errors + other.errors,
                   self.latencies + other.latencies, self.first_token + other.first_token,
                   self.client_cpu_s + other.client_cpu_s)

    def summary(self) -> dict:
        ms = np.asarray(self.latencies or [0.0]) * 1000
        out = {"tokens": self.tokens, "requests": self.requests, "seconds": self.seconds,
               "errors": self.errors,
               "tokens_per_s": self.tokens / self.seconds if self.seconds else 0.0,
               "tokens_per_request": self.tokens / self.requests if self.requests else 0.0,
               "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}
        if self.first_token:
            first = np.asarray(self.first_token) * 1000
            out |= {"ttft_p50_ms": float(np.percentile(first, 50)),
                    "ttft_p99_ms": float(np.percentile(first, 99)),
                    "ttft_max_ms": float(first.max())}
        if self.client_cpu_s:
            out["client_cpu_share"] = self.client_cpu_s / (self.seconds * CORES)
        return out


# ---- the service over HTTP: raw asyncio keep-alive connections (light on 2 cores)


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status = int((await reader.readline()).split(b" ", 2)[1])
    headers = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            return status, headers
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str],
                    on_chunk: Callable[[bytes], None] | None = None) -> bytes:
    """A response body by Content-Length, or chunked (a stream: `on_chunk` sees each
    chunk as it arrives)."""
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    parts = []
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            await reader.readline()  # the CRLF after the last chunk (no trailers)
            return b"".join(parts)
        chunk = await reader.readexactly(size)
        await reader.readexactly(2)
        if on_chunk:
            on_chunk(chunk)
        parts.append(chunk)


def completion_tokens(body: bytes, streamed: bool) -> int:
    """Tokens a /generate answer made: the JSON answer's usage, or the stream's last
    event (the whole answer); ValueError for an error event."""
    if streamed:
        events = [e for e in body.decode().split("\n\n") if e.strip()]
        if not events or events[-1].startswith("event: error"):
            raise ValueError(f"the stream ended with {events[-1] if events else 'nothing'}")
        body = events[-1].split("data: ", 1)[1].encode()
    return int(json.loads(body)["usage"]["completion_tokens"])


async def client(port: int, requests: list[bytes], turn: itertools.count, stop_at: float,
                 run: Run, streamed: bool) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        while time.perf_counter() < stop_at:
            request = requests[next(turn) % len(requests)]
            first: list[float] = []

            def seen(chunk: bytes, first=first) -> None:
                if not first and b"data: " in chunk:
                    first.append(time.perf_counter())

            sent = time.perf_counter()
            writer.write(request)
            try:
                status, headers = await read_head(reader)
                body = await read_body(reader, headers, seen)
                tokens = completion_tokens(body, streamed) if status == 200 else None
            except (asyncio.IncompleteReadError, ConnectionError, ValueError, IndexError,
                    KeyError):
                tokens = None
                writer.close()
                reader, writer = await asyncio.open_connection(HOST, port)
            if tokens is None:
                run.errors += 1
                continue
            run.latencies.append(time.perf_counter() - sent)
            run.tokens += tokens
            run.requests += 1
            if streamed and first:
                run.first_token.append(first[0] - sent)
    finally:
        writer.close()


def service_load(port: int, requests: list[bytes], concurrency: int, seconds: float,
                 streamed: bool = False) -> Run:
    """`concurrency` clients sending /generate back to back for `seconds`; every answer
    that started in time counts, and the time is until the last one came."""
    async def go() -> Run:
        run, turn = Run(), itertools.count()
        cpu, start = time.process_time(), time.perf_counter()
        await asyncio.gather(*(client(port, requests, turn, start + seconds, run, streamed)
                               for _ in range(concurrency)))
        run.seconds = time.perf_counter() - start
        run.client_cpu_s = time.process_time() - cpu
        return run
    return asyncio.run(go())


def http_requests(prompts: list[str], new_tokens: int, streamed: bool) -> list[bytes]:
    out = []
    for prompt in prompts:
        body = json.dumps({"prompt": prompt, "max_new_tokens": new_tokens,
                           "min_new_tokens": new_tokens, "temperature": 0.0,
                           "stream": streamed}).encode()
        out.append((f"POST /generate HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: "
                    f"application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
    return out


# ---- in this process: the Decoder (the ceiling) and the PyTorch loop
