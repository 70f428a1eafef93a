"""The HTTP gateway against the embedded scheduler, in one run.

    .venv/bin/python benchmarks/gateway.py [--seconds 5] [--requests 2000] [--slow-seconds 12] [--blobs 10000]

1. latency: one client, sequential small requests (``app/echo`` of a small JSON object), p50 and
   p99 of the embedded ``Scheduler.run`` and of ``POST /v1/tasks?wait=true`` over one keep-alive
   connection (a minimal HTTP/1.1 client, so the figure is the gateway's cost, not a client
   library's), plus the same through ``edgecompute.client.Client`` (httpx) for reference;
2. throughput: 50 concurrent keep-alive connections for ``--seconds``, every answer counted by
   status (a server in its own process; the load generator in this one, on the same cores), with a
   raw asyncio HTTP/1.1 client (the server's capacity) and then with the project's
   ``edgecompute.client.AsyncClient`` at 50 concurrent ``run`` calls (the client's cost on top), then
   the raw client again: the ratio is AsyncClient / the mean of the two raw runs;
3. rate limit: a key limited to 200 requests/s (burst 20) hammered by 10 connections: admitted
   versus ``burst + rate * time``;
4. streaming: a generated-token stream (10 tokens, 50 ms apart) over SSE and WebSocket: when the
   first and the last token arrive;
5. slow clients: a normal client (10 connections) alone, then beside 200 connections that send a
   request head one byte a second for ``--slow-seconds`` (reconnecting when the server cuts them
   off), then alone again: its throughput under attack against the mean of the two quiet runs, and
   the longest time the server kept a slow connection open (against ``header_timeout``);
6. memory: ``--blobs`` (10,000) tasks whose outputs are 1 MB each (fresh bytes every time), fetched
   by 8 connections; the server's RSS after them, against its kept-result byte budget
   (``server.keep_finished_bytes``, default 256 MiB) + 100 MB;
7. gRPC (docs/grpc.md), served by the same process on its own port over the same gateway: the
   sequential p50/p99 of ``Submit`` (wait) with a raw ``grpc.aio`` call (pre-serialized bytes, so
   the figure is the server's cost) and through ``edgecompute.grpc_client.GrpcClient``; 50
   concurrent callers over one HTTP/2 channel (raw, then ``AsyncGrpcClient``) in requests/s beside
   the raw HTTP figure of 2.; the token stream's first and last token.

The server runs with its default settings except ``access_log = false`` (one JSON line per
request costs ~10 us more; see docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

KEY = "ec_benchmark-key-000000000000000000000000000"
LIMITED_KEY = "ec_benchmark-limited-key-0000000000000000000"
TOKENS = [f" token{i}" for i in range(10)]
BLOB_BYTES = 1 << 20


def functions() -> Any:
    from edgecompute import FunctionExecutor, Resources

    app = FunctionExecutor("app")

    @app.algorithm(resources=Resources(cpu=0))
    async def echo(inputs: Any) -> Any:
        return inputs

    @app.algorithm(resources=Resources(cpu=0))
    async def blob(inputs: Any) -> Any:
        # a fresh 1 MB every time, every page written: what a real result costs the server to keep
        return bytes((int(inputs) % 251,)) * BLOB_BYTES

    @app.algorithm(resources=Resources(cpu=0))
    async def generate(inputs: Any, *, ctx: Any) -> Any:
        for token in TOKENS:
            await asyncio.sleep(0.05)
            await ctx.emit(token)
        return "".join(TOKENS)

    return app


def bare_grpc(app: Any, port: int) -> None:
    """A grpc.aio server that echoes raw bytes, in the gateway's process and loop: the floor any
    grpc.aio service pays per call (the baseline of the gRPC rows)."""
    from contextlib import asynccontextmanager

    import grpc.aio

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(target: Any) -> Any:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "bench.Bare", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        async with inner(target) as state:
            yield state
        await server.stop(0)

    app.router.lifespan_context = lifespan


def serve(port: int, grpc_port: int | None = None, bare_port: int | None = None) -> None:
    import uvicorn

    from edgecompute import Config, Registry, Resources, Scheduler
    from edgecompute.server import ServerSettings, build_app, hash_key
    from edgecompute.server.protocol import uvicorn_config

    settings = ServerSettings.from_mapping({"access_log": False, "header_timeout": HEADER_TIMEOUT, "keys": [
        {"name": "bench", "hash": hash_key(KEY), "scopes": ["app/*"]},
        {"name": "limited", "hash": hash_key(LIMITED_KEY), "scopes": ["app/*"], "rate": 200.0, "burst": 20},
    ]})
    scheduler = Scheduler(Registry([functions()]), config=Config(), capacity=Resources(cpu=2))
    # the server as `edgecompute serve` runs it: the guarded HTTP protocol with the settings' limits
    app = build_app(settings, scheduler)
    if grpc_port is not None:
        from edgecompute.server.grpc import attach

        attach(app, host="127.0.0.1", port=grpc_port)  # as `edgecompute serve` with server.grpc_port
    if bare_port is not None:
        bare_grpc(app, bare_port)
    config = uvicorn_config(app, settings, host="127.0.0.1", port=port,
                            log_level="warning", loop="uvloop", ws="websockets-sansio")
    uvicorn.Server(config).run()


HEADER_TIMEOUT = 10.0  # the server's default: a request head must arrive within this

BODY = json.dumps({"algorithm": "app/echo", "inputs": {"text": "hello", "n": 3}}).encode()


def http_request(key: str, body: bytes = BODY) -> bytes:
    return (b"POST /v1/tasks?wait=true HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + key.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return status


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def embedded_latency(n: int) -> list[float]:
    from edgecompute import Config, Registry, Resources, Scheduler

    inputs = {"text": "hello", "n": 3}
    async with Scheduler(Registry([functions()]), config=Config(), capacity=Resources(cpu=2)) as scheduler:
        for _ in range(200):
            await scheduler.run("app/echo", inputs)
        times = []
        for _ in range(n):
            start = time.perf_counter()
            await scheduler.run("app/echo", inputs)
            times.append(time.perf_counter() - start)
    return times


async def gateway_latency(port: int, n: int) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = http_request(KEY)
    for _ in range(200):
        assert await exchange(reader, writer, request) == 200
    times = []
    for _ in range(n):
        start = time.perf_counter()
        status = await exchange(reader, writer, request)
        times.append(time.perf_counter() - start)
        assert status == 200, status
    writer.close()
    return times


def client_latency(port: int, n: int) -> list[float]:
    from edgecompute.client import Client

    inputs = {"text": "hello", "n": 3}
    with Client(f"http://127.0.0.1:{port}", KEY) as client:
        for _ in range(100):
            client.run("app/echo", inputs)
        times = []
        for _ in range(n):
            start = time.perf_counter()
            client.run("app/echo", inputs)
            times.append(time.perf_counter() - start)
    return times


async def load(port: int, key: str, connections: int, seconds: float) -> tuple[dict[int, int], float]:
    request = http_request(key)
    statuses: dict[int, int] = {}
    stop = time.monotonic() + seconds

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < stop:
                status = await exchange(reader, writer, request)
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return statuses, time.monotonic() - start


async def under_slowloris(port: int, connections: int, seconds: float) -> tuple[dict[int, int], float, list[float]]:
    """A normal client (10 connections of ``load``) while ``connections`` others send a request head one
    byte a second. Returns the normal client's statuses and elapsed time, and how long the server kept
    each slow connection open (a connection the server never closed counts as ``inf``)."""
    stop = time.monotonic() + seconds
    lifetimes: list[float] = []

    async def slow() -> None:
        head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 4096
        while time.monotonic() < stop:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            opened = time.monotonic()
            closed = False
            try:
                for byte in head:
                    writer.write(bytes([byte]))
                    try:
                        await asyncio.wait_for(reader.read(65536), 1.0)  # the server's answer, or its close
                        closed = True
                        break
                    except TimeoutError:
                        pass
                    if time.monotonic() > stop + 15:
                        break
            finally:
                lifetimes.append(time.monotonic() - opened if closed else float("inf"))
                writer.close()

    attack = [asyncio.create_task(slow()) for _ in range(connections)]
    await asyncio.sleep(1.0)  # every slow connection is open and trickling before the normal client starts
    statuses, elapsed = await load(port, KEY, 10, seconds - 1.0)
    await asyncio.gather(*attack)
    return statuses, elapsed, lifetimes


async def client_load(port: int, concurrency: int, seconds: float) -> tuple[int, float]:
    """The project's AsyncClient: ``concurrency`` callers of ``run`` over one client."""
    from edgecompute.client import AsyncClient

    inputs = {"text": "hello", "n": 3}
    count = 0
    async with AsyncClient(f"http://127.0.0.1:{port}", KEY, max_connections=concurrency) as client:
        await asyncio.gather(*(client.run("app/echo", inputs) for _ in range(concurrency)))  # open the pool
        stop = time.monotonic() + seconds

        async def caller() -> None:
            nonlocal count
            while time.monotonic() < stop:
                await client.run("app/echo", inputs)
                count += 1

        start = time.monotonic()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return count, time.monotonic() - start


async def blobs(port: int, total: int, connections: int = 8) -> dict[int, int]:
    """``total`` tasks with 1 MB outputs, each answer read whole (binary frames: no base64)."""
    statuses: dict[int, int] = {}
    left = iter(range(total))

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for n in left:
                body = json.dumps({"algorithm": "app/blob", "inputs": n}).encode()
                request = http_request(KEY, body).replace(b"Content-Type:", b"Accept: application/x-edgecompute\r\n"
                                                          b"Content-Type:", 1)
                try:
                    status = await exchange(reader, writer, request)
                except (ConnectionError, asyncio.IncompleteReadError):
                    status = 0  # the server closed the connection: counted, and a new one
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return statuses


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def result_budget() -> int | None:
    """The server's kept-result byte budget (its default), or None on a server without one."""
    from edgecompute.server import ServerSettings

    budget = getattr(ServerSettings(), "keep_finished_bytes", None)
    return budget if isinstance(budget, int) else None


def streaming(port: int) -> dict[str, tuple[float, float, int]]:
    import httpx
    from websockets.sync.client import connect

    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {KEY}"}
    results = {}
    for transport in ("sse", "ws"):
        task_id = httpx.post(f"{url}/v1/tasks", json={"algorithm": "app/generate"}, headers=headers).json()["id"]
        start = time.perf_counter()
        arrivals = []
        if transport == "sse":
            with httpx.stream("GET", f"{url}/v1/tasks/{task_id}/events", headers=headers) as response:
                event = ""
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: ") and event == "chunk":
                        arrivals.append(time.perf_counter() - start)
        else:
            with connect(f"ws://127.0.0.1:{port}/v1/tasks/{task_id}/ws", additional_headers=headers) as ws:
                for message in ws:
                    if json.loads(message)["type"] == "chunk":
                        arrivals.append(time.perf_counter() - start)
        results[transport] = (arrivals[0], arrivals[-1], len(arrivals))
    return results


# -- gRPC ------------------------------------------------------------------------------------------


def grpc_submit_bytes() -> bytes:
    """The raw rows' request: JSON in and out, as the raw HTTP rows send and get."""
    from edgecompute.grpc_proto import JSON, encode_value, pb

    return pb.SubmitRequest(algorithm="app/echo", inputs=encode_value({"text": "hello", "n": 3}, JSON),
                            wait=60.0, accept=JSON).SerializeToString()


async def grpc_latency(port: int, n: int, *, bare: bool = False) -> list[float]:
    """Sequential ``Submit`` calls (or, ``bare``, the bare echo server's calls with the same bytes)."""
    import grpc.aio

    from edgecompute.grpc_proto import METHODS, pb

    request = grpc_submit_bytes()
    metadata = (("authorization", f"Bearer {KEY}"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        submit = channel.unary_unary("/bench.Bare/Echo" if bare else METHODS["Submit"])
        for _ in range(200):
            await submit(request, metadata=metadata)
        times = []
        for _ in range(n):
            start = time.perf_counter()
            answer = await submit(request, metadata=metadata)
            times.append(time.perf_counter() - start)
        assert bare or pb.Task.FromString(answer).state == "succeeded"
    return times


def grpc_client_latency(port: int, n: int) -> list[float]:
    from edgecompute.grpc_client import GrpcClient

    inputs = {"text": "hello", "n": 3}
    with GrpcClient(f"127.0.0.1:{port}", KEY) as client:
        for _ in range(100):
            client.run("app/echo", inputs)
        times = []
        for _ in range(n):
            start = time.perf_counter()
            client.run("app/echo", inputs)
            times.append(time.perf_counter() - start)
    return times


async def grpc_load(port: int, concurrency: int, seconds: float, *, client: bool = False,
                    bare: bool = False) -> tuple[dict[str, int], float]:
    """``concurrency`` callers over one channel: raw ``grpc.aio`` calls (to the bare echo server
    with ``bare``) or ``AsyncGrpcClient.run``."""
    import grpc.aio

    from edgecompute.grpc_client import AsyncGrpcClient
    from edgecompute.grpc_proto import METHODS

    codes: dict[str, int] = {}
    request = grpc_submit_bytes()
    metadata = (("authorization", f"Bearer {KEY}"),)
    inputs = {"text": "hello", "n": 3}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel, \
            AsyncGrpcClient(f"127.0.0.1:{port}", KEY) as remote:
        submit = channel.unary_unary("/bench.Bare/Echo" if bare else METHODS["Submit"])

        async def one() -> str:
            try:
                if client:
                    await remote.run("app/echo", inputs)
                else:
                    await submit(request, metadata=metadata)
                return "OK"
            except grpc.aio.AioRpcError as exc:
                return exc.code().name
            except Exception as exc:  # noqa: BLE001 - counted by class, as statuses are
                return type(exc).__name__

        await asyncio.gather(*(one() for _ in range(concurrency)))  # connect, warm up
        stop = time.monotonic() + seconds

        async def caller() -> None:
            while time.monotonic() < stop:
                code = await one()
                codes[code] = codes.get(code, 0) + 1

        start = time.monotonic()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return codes, time.monotonic() - start


def grpc_streaming(port: int) -> tuple[float, float, int]:
    from edgecompute.grpc_client import GrpcClient

    with GrpcClient(f"127.0.0.1:{port}", KEY) as client:
        task = client.submit("app/generate")
        start = time.perf_counter()
        arrivals = [time.perf_counter() - start for _ in task.stream()]
    return arrivals[0], arrivals[-1], len(arrivals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--slow-seconds", type=float, default=12.0, help="length of the slow-client rows")
    parser.add_argument("--blobs", type=int, default=10_000, help="tasks with 1 MB outputs for the RSS row")
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--grpc-serve", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--bare-serve", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve, args.grpc_serve, args.bare_serve)
        return
    import uvloop

    ports = []
    for _ in range(3):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    port, grpc_port, bare_port = ports
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--grpc-serve", str(grpc_port),
                               "--bare-serve", str(bare_port)], env={**os.environ})
    try:
        import httpx

        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the gateway did not start")
            time.sleep(0.1)

        embedded = uvloop.run(embedded_latency(args.requests))
        gateway = uvloop.run(gateway_latency(port, args.requests))
        remote = client_latency(port, max(200, args.requests // 4))
        statuses, elapsed = uvloop.run(load(port, KEY, 50, args.seconds))
        client_count, client_elapsed = uvloop.run(client_load(port, 50, args.seconds))
        statuses_after, elapsed_after = uvloop.run(load(port, KEY, 50, args.seconds))
        bare = uvloop.run(grpc_latency(bare_port, args.requests, bare=True))
        rpc = uvloop.run(grpc_latency(grpc_port, args.requests))
        rpc_client = grpc_client_latency(grpc_port, max(200, args.requests // 4))
        bare_codes, bare_elapsed = uvloop.run(grpc_load(bare_port, 50, args.seconds, bare=True))
        rpc_codes, rpc_elapsed = uvloop.run(grpc_load(grpc_port, 50, args.seconds))
        rpc_client_codes, rpc_client_elapsed = uvloop.run(grpc_load(grpc_port, 50, args.seconds, client=True))
        rpc_stream = grpc_streaming(grpc_port)
        limited, limited_elapsed = uvloop.run(load(port, LIMITED_KEY, 10, 3.0))
        quiet_before, quiet_before_s = uvloop.run(load(port, KEY, 10, args.slow_seconds - 1.0))
        attacked, attacked_s, lifetimes = uvloop.run(under_slowloris(port, 200, args.slow_seconds))
        quiet_after, quiet_after_s = uvloop.run(load(port, KEY, 10, args.slow_seconds - 1.0))
        streams = streaming(port)
        rss_before = rss_bytes(server.pid)
        blob_statuses = uvloop.run(blobs(port, args.blobs))
        rss_after = rss_bytes(server.pid)
    finally:
        server.terminate()
        server.wait(10)

    ms = 1000.0
    e50, g50, c50 = statistics.median(embedded), statistics.median(gateway), statistics.median(remote)
    print(f"gateway benchmark ({os.cpu_count()} CPUs; server and load generator share them)\n")
    print(f"{'sequential small requests':42} {'p50 ms':>9} {'p99 ms':>9}")
    print(f"{'embedded Scheduler.run':42} {e50 * ms:9.3f} {percentile(embedded, 0.99) * ms:9.3f}")
    print(f"{'gateway, raw HTTP/1.1 keep-alive':42} {g50 * ms:9.3f} {percentile(gateway, 0.99) * ms:9.3f}")
    print(f"{'gateway, edgecompute.client.Client (httpx)':42} {c50 * ms:9.3f} {percentile(remote, 0.99) * ms:9.3f}")
    print(f"gateway cost over embedded, p50: {(g50 - e50) * ms:.3f} ms (target <= 1 ms: "
          f"{'met' if g50 - e50 <= 0.001 else 'MISSED'}); with the httpx client: {(c50 - e50) * ms:.3f} ms\n")
    total = sum(statuses.values())
    errors = {status: count for status, count in statuses.items() if status not in (200, 429)}
    rate = total / elapsed
    print(f"throughput, 50 concurrent connections, {elapsed:.1f} s: {rate:,.0f} requests/s, statuses {statuses} "
          f"(target >= 2,000/s, no errors but 429: {'met' if rate >= 2000 and not errors else 'MISSED'})")
    raw_after = sum(statuses_after.values()) / elapsed_after
    client_rate = client_count / client_elapsed
    raw_mean = (rate + raw_after) / 2
    print(f"raw client again after the AsyncClient run: {raw_after:,.0f} requests/s, statuses {statuses_after}")
    print(f"edgecompute.client.AsyncClient, 50 concurrent run() calls, {client_elapsed:.1f} s: {client_rate:,.0f} "
          f"requests/s = {client_rate / raw_mean:.0%} of the raw client's mean {raw_mean:,.0f}/s "
          f"(target >= 50%: {'met' if client_rate >= 0.5 * raw_mean else 'MISSED'})")
    admitted = limited.get(200, 0)
    expected = 20 + 200.0 * limited_elapsed
    print(f"rate limit 200/s burst 20, 10 connections, {limited_elapsed:.2f} s: admitted {admitted}, expected "
          f"{expected:.0f} ({(admitted - expected) / expected:+.1%}; target within 10%), statuses {limited}")
    quiet = (sum(quiet_before.values()) / quiet_before_s + sum(quiet_after.values()) / quiet_after_s) / 2
    attacked_rate = attacked.get(200, 0) / attacked_s
    timeout = HEADER_TIMEOUT
    longest = max(lifetimes)
    print(f"200 slow clients (a request head at 1 byte/s, {args.slow_seconds:.0f} s) beside a normal client of 10 "
          f"connections: {attacked_rate:,.0f} requests/s = {attacked_rate / quiet:.0%} of its {quiet:,.0f}/s without "
          f"them (target >= 95%: {'met' if attacked_rate >= 0.95 * quiet else 'MISSED'}); statuses {attacked}; "
          f"{len(lifetimes)} slow connections, the longest kept {longest:.1f} s (header_timeout {timeout:g} s: "
          f"{'every one closed in time' if longest <= timeout + 1.0 else 'MISSED'})")
    for transport, (first, last, count) in streams.items():
        print(f"stream over {transport.upper():3}: {count} tokens, first at {first * ms:.0f} ms, "
              f"last at {last * ms:.0f} ms")
    r50, rc50, b50 = statistics.median(rpc), statistics.median(rpc_client), statistics.median(bare)
    rpc_rate = sum(rpc_codes.values()) / rpc_elapsed
    rpc_client_rate = sum(rpc_client_codes.values()) / rpc_client_elapsed
    bare_rate = sum(bare_codes.values()) / bare_elapsed
    print(f"\n{'gRPC (same server process, its own port)':42} {'p50 ms':>9} {'p99 ms':>9}")
    print(f"{'bare grpc.aio echo (the floor)':42} {b50 * ms:9.3f} {percentile(bare, 0.99) * ms:9.3f}")
    print(f"{'gRPC Submit(wait), raw grpc.aio call':42} {r50 * ms:9.3f} {percentile(rpc, 0.99) * ms:9.3f}")
    print(f"{'gRPC, edgecompute.grpc_client.GrpcClient':42} {rc50 * ms:9.3f} {percentile(rpc_client, 0.99) * ms:9.3f}")
    print(f"gRPC cost over embedded, p50: {(r50 - e50) * ms:.3f} ms (HTTP: {(g50 - e50) * ms:.3f} ms; "
          f"gRPC / HTTP p50 = {r50 / g50:.2f}x); over the bare grpc.aio echo: {(r50 - b50) * ms:.3f} ms; "
          f"with GrpcClient: {(rc50 - e50) * ms:.3f} ms")
    print(f"bare grpc.aio echo, 50 concurrent callers on one channel, {bare_elapsed:.1f} s: {bare_rate:,.0f} "
          f"requests/s; codes {bare_codes}")
    print(f"gRPC throughput, 50 concurrent callers on one channel, {rpc_elapsed:.1f} s: {rpc_rate:,.0f} requests/s "
          f"= {rpc_rate / raw_mean:.0%} of raw HTTP's {raw_mean:,.0f}/s, {rpc_rate / bare_rate:.0%} of the bare "
          f"echo's; codes {rpc_codes}")
    print(f"AsyncGrpcClient, 50 concurrent run() calls, {rpc_client_elapsed:.1f} s: {rpc_client_rate:,.0f} requests/s "
          f"= {rpc_client_rate / rpc_rate:.0%} of raw gRPC; codes {rpc_client_codes}")
    first, last, count = rpc_stream
    print(f"stream over gRPC: {count} tokens, first at {first * ms:.0f} ms, last at {last * ms:.0f} ms\n")
    mb = 1e6
    budget = result_budget()
    verdict = ("n/a: no budget setting" if budget is None else
               f"bar {(budget + 100 * mb) / mb:,.0f} MB = keep_finished_bytes {budget / mb:,.0f} MB + 100 MB: "
               + ("met" if rss_after <= budget + 100 * mb else "MISSED"))
    print(f"server RSS after {args.blobs:,} tasks with {BLOB_BYTES / mb:.2f} MB outputs: {rss_after / mb:,.0f} MB "
          f"(before them {rss_before / mb:,.0f} MB; statuses {blob_statuses}); {verdict}")


if __name__ == "__main__":
    main()
