"""A cheap HTTP/1.1 load generator: raw asyncio sockets, keep-alive, prebuilt requests.

It shares the machine's cores with the server it measures, so it must cost little
per request: no HTTP library, no JSON parsing of the answers (only the status line
and Content-Length are read). Its own CPU time is reported with the results.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class LoadResult:
    requests: int = 0  # answered (2xx), whose latencies are kept
    errors: int = 0  # non-2xx answers and broken connections
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    client_cpu_s: float = 0.0

    def __add__(self, other: LoadResult) -> LoadResult:
        """Two measurements of the same setting as one (their requests, time and
        latencies together)."""
        return LoadResult(self.requests + other.requests, self.errors + other.errors,
                          self.latencies + other.latencies, self.seconds + other.seconds,
                          self.client_cpu_s + other.client_cpu_s)

    def summary(self, items_per_request: int, cores: int, rate: str = "texts_per_s") -> dict:
        """Throughput (requests, and items under the key `rate`), latency percentiles,
        errors and the load generator's share of the cores."""
        ms = np.asarray(self.latencies) * 1000 if self.latencies else np.zeros(1)
        return {
            "requests": self.requests,
            "errors": self.errors,
            "req_per_s": self.requests / self.seconds,
            rate: self.requests * items_per_request / self.seconds,
            "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)),
            "client_cpu_share": self.client_cpu_s / (self.seconds * cores),
        }


def build_requests(host: str, path: str, bodies: list[bytes]) -> list[bytes]:
    return [
        (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
         f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        for body in bodies
    ]


async def _read_response(reader: asyncio.StreamReader) -> int:
    status = int((await reader.readline()).split(b" ", 2)[1])
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return status


async def _connection(host, port, requests, offset, stop_at, warm_until, result):
    reader, writer = await asyncio.open_connection(host, port)
    i = offset
    try:
        while (now := time.perf_counter()) < stop_at:
            writer.write(requests[i % len(requests)])
            i += 1
            try:
                status = await _read_response(reader)
            except (asyncio.IncompleteReadError, ConnectionError, ValueError, IndexError):
                result.errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
                continue
            if now >= warm_until:  # only answers count: a quick error is no throughput
                if 200 <= status < 300:
                    result.requests += 1
                    result.latencies.append(time.perf_counter() - now)
                else:
                    result.errors += 1
    finally:
        writer.close()


async def _run(host, port, requests, concurrency, seconds, warmup):
    result = LoadResult()
    start = time.perf_counter()
    warm_until, stop_at = start + warmup, start + warmup + seconds
    cpu = time.process_time()
    await asyncio.gather(*(
        _connection(host, port, requests, k * 7, stop_at, warm_until, result)
        for k in range(concurrency)
    ))
    result.client_cpu_s = (time.process_time() - cpu) * seconds / (seconds + warmup)
    result.seconds = seconds
    return result


def run_load(host: str, port: int, requests: list[bytes], concurrency: int,
             seconds: float = 6.0, warmup: float = 1.0) -> LoadResult:
    """`concurrency` keep-alive connections, each sending its next request as soon as
    the last is answered, for `warmup` + `seconds`; only the last `seconds` count."""
    return asyncio.run(_run(host, port, requests, concurrency, seconds, warmup))
