"""Load test of `inpformer serve`: N concurrent clients POST one image each, again and again, for T seconds (or
until R requests); prints requests/s, p50/p95/p99 latency, the errors and the server's resident memory.

    python benchmarks/serve_load.py runs/demo --clients 16 --seconds 20        # starts a server on loopback
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --image part.png
    python benchmarks/serve_load.py runs/demo --soak 300 --clients 16          # memory growth over 5 minutes
    python benchmarks/serve_load.py runs/demo --bombs 8                        # peak memory under pixel bombs

Memory is the resident set (VmRSS in /proc/PID/status) of the server process and its children: known when this
script starts the server, or given with --pid.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import math
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", metavar="RUN_DIR", help="start `inpformer serve` with this model")
    parser.add_argument("--url", help="or target this running server instead")
    parser.add_argument("--runtime", default="torch", help="with RUN_DIR: torch, onnx or onnx-int8")
    parser.add_argument("--workers", type=int, default=1, help="with RUN_DIR: server processes")
    parser.add_argument("--max-batch", type=int, default=8, help="with RUN_DIR: images per inference call")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to send requests")
    parser.add_argument("--max-requests", type=int, default=10_000, help="stop after this many requests")
    parser.add_argument("--image", help="image to send (default: a generated 256x256 PNG)")
    parser.add_argument("--overlay", action="store_true", help="ask for the overlay PNG too")
    parser.add_argument("--api-key")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id, to report its memory")
    parser.add_argument("--soak", type=float, metavar="SECONDS",
                        help="soak test: send requests for SECONDS, however many, sampling the server's memory")
    parser.add_argument("--bombs", type=int, metavar="N",
                        help="instead of the load: N concurrent requests of 32 7000x7000 1-bit PNGs each, then N "
                             "of the largest image a request may carry (overlay on); reports peak memory growth")
    args = parser.parse_args()
    if bool(args.model) == bool(args.url):
        parser.error("give either RUN_DIR (to start a server) or --url")
    if args.soak:
        args.seconds, args.max_requests = args.soak, math.inf

    image = Path(args.image).read_bytes() if args.image else generated_png(256)
    server = None
    try:
        if args.model:
            server, url = start_server(args.model, args.runtime, args.workers, args.max_batch)
        else:
            url = args.url.rstrip("/")
        pid = server.pid if server else args.pid
        if args.bombs:
            asyncio.run(bombs(url, pid, args))
            return
        latencies, errors, elapsed, memory = asyncio.run(load(url, image, args, pid))
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    report(latencies, errors, elapsed, args.clients, memory)


def generated_png(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def start_server(model: str, runtime: str, workers: int, max_batch: int) -> tuple[subprocess.Popen, str]:
    """`inpformer serve` on a free loopback port, once its /health answers (the log goes to a temporary file)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.NamedTemporaryFile("w", prefix="serve_load_", suffix=".log", delete=False) as log:
        server = subprocess.Popen([sys.executable, "-m", "inpformer", "serve", model, "--port", str(port),
                                   "--runtime", runtime, "--workers", str(workers), "--max-batch", str(max_batch)],
                                  stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if server.poll() is not None:
            sys.exit(f"the server exited (code {server.returncode}); see {log.name}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            server.terminate()
            sys.exit(f"the server did not start in 300 s; see {log.name}")
        time.sleep(0.5)
    print(f"server: {url} ({runtime}, {workers} worker(s), log {log.name})")
    return server, url


def resident(pid: int, field: str = "VmRSS") -> int:
    """Bytes of `field` (VmRSS, or VmHWM: the peak) of process `pid` and its descendants, summed."""
    pids, total = [pid], 0
    for parent in pids:  # grows while walked: uvicorn's worker processes, and theirs
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            pids += [int(child) for child in children.read_text().split()]
    for process in pids:
        try:
            status = Path(f"/proc/{process}/status").read_text()
        except FileNotFoundError:  # exited meanwhile
            continue
        total += int(status.split(f"{field}:")[1].split()[0]) * 1024
    return total


async def sample_memory(pid: int, samples: list[int], every: float) -> None:
    """Appends the server's resident bytes to `samples` every `every` seconds, until cancelled."""
    while True:
        samples.append(resident(pid))
        await asyncio.sleep(every)


async def load(url: str, image: bytes, args: argparse.Namespace,
               pid: int | None) -> tuple[list[float], collections.Counter, float, list[int]]:
    """Latencies (s) of the successful requests, error counts by status or exception, the elapsed time and the
    server's resident bytes sampled every second from the end of the warm-up (empty without `pid`)."""
    headers = {"content-type": "application/octet-stream", **({"X-API-Key": args.api_key} if args.api_key else {})}
    params = {"overlay": "true"} if args.overlay else {}
    latencies: list[float] = []
    errors: collections.Counter = collections.Counter()
    sent = 0
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as client:
        warm_up = await client.post("/predict", content=image, params=params)  # first call may compile / allocate
        warm_up.raise_for_status()
        memory: list[int] = []
        sampler = asyncio.create_task(sample_memory(pid, memory, 1.0)) if pid else None
        start = time.perf_counter()
        deadline = start + args.seconds

        async def client_loop() -> None:
            nonlocal sent
            while time.perf_counter() < deadline and sent < args.max_requests:
                sent += 1
                began = time.perf_counter()
                try:
                    response = await client.post("/predict", content=image, params=params)
                except httpx.HTTPError as error:
                    errors[type(error).__name__] += 1
                    continue
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - began)
                else:
                    errors[f"HTTP {response.status_code}"] += 1

        await asyncio.gather(*(client_loop() for _ in range(args.clients)))
        elapsed = time.perf_counter() - start
        if sampler:
            sampler.cancel()
            memory.append(resident(pid))
        return latencies, errors, elapsed, memory


def one_bit_png(width: int, height: int) -> bytes:
    """A black 1-bit PNG: a few KB that decode to width x height RGB pixels (a decompression bomb)."""
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def noise_jpeg(side: int) -> bytes:
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, "JPEG", quality=50)
    return buffer.getvalue()


async def bombs(url: str, pid: int | None, args: argparse.Namespace) -> None:
    """N concurrent requests of each kind of pixel bomb; prints the answers and the server's peak memory growth."""
    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as client:
        limits = (await client.get("/model")).raise_for_status().json()["limits"]
        (await client.post("/predict", content=generated_png(256))).raise_for_status()  # warm up
        side, shared = math.isqrt(limits["max_request_pixels"]), math.isqrt(limits["max_inflight_pixels"] // args.bombs)
        phases = [("32 x 7000x7000 1-bit PNG (6 KB each) per request", {}, [
                      ("files", (f"{i}.png", one_bit_png(7000, 7000), "image/png")) for i in range(32)]),
                  (f"1 x {side}x{side} 1-bit PNG (the most pixels a request may carry), overlay on",
                   {"overlay": "true"}, [("files", ("big.png", one_bit_png(side, side), "image/png"))]),
                  (f"1 x {side}x{side} noise JPEG (the largest answer: incompressible overlay), overlay on",
                   {"overlay": "true"}, [("files", ("noise.jpg", noise_jpeg(side), "image/jpeg"))]),
                  (f"1 x {shared}x{shared} noise JPEG (all requests fit in the budget together), overlay on",
                   {"overlay": "true"}, [("files", ("noise.jpg", noise_jpeg(shared), "image/jpeg"))])]
        print(f"server limits: {limits['max_pixels']} pixels per image, {limits['max_request_pixels']} per request, "
              f"{limits['max_inflight_pixels']} in flight")
        start = resident(pid) if pid else 0
        for label, params, files in phases:
            if pid:
                Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM, the peak, to the current VmRSS
                before = resident(pid)
            began = time.perf_counter()
            answers = await asyncio.gather(*(client.post("/predict", params=params, files=files)
                                             for _ in range(args.bombs)), return_exceptions=True)
            statuses = collections.Counter(getattr(a, "status_code", type(a).__name__) for a in answers)
            print(f"{args.bombs} concurrent requests of {label}: {dict(statuses)} in "
                  f"{time.perf_counter() - began:.1f} s")
            for answer in answers:
                if getattr(answer, "status_code", 200) != 200:
                    print(f"  e.g. {answer.status_code}: {answer.json()['error']}")
                    break
            if pid:
                peak = resident(pid, "VmHWM")
                print(f"  server RSS before {before / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB: "
                      f"+{(peak - before) / 2**20:.0f} MiB (+{(peak - start) / 2**20:.0f} MiB over its start)")


def report(latencies: list[float], errors: collections.Counter, elapsed: float, clients: int,
           memory: list[int]) -> None:
    total = len(latencies) + sum(errors.values())
    print(f"{clients} clients, {elapsed:.1f} s: {total} requests, {len(latencies) / elapsed:.1f} successful requests/s")
    if latencies:
        p50, p95, p99 = np.percentile(np.asarray(latencies) * 1000, [50, 95, 99])
        print(f"latency ms: p50 {p50:.1f}  p95 {p95:.1f}  p99 {p99:.1f}  max {max(latencies) * 1000:.1f}")
    print(f"errors: {sum(errors.values())}" + (f" ({dict(errors)})" if errors else ""))
    if memory:
        start, end, peak = memory[0], memory[-1], max(memory)
        print(f"server RSS: start {start / 2**20:.0f} MiB, end {end / 2**20:.0f} MiB ({(end - start) / start:+.1%}), "
              f"peak {peak / 2**20:.0f} MiB")
        tenths = [memory[round(i * (len(memory) - 1) / 10)] / 2**20 for i in range(11)]
        print("server RSS MiB at each tenth of the run: " + " ".join(f"{m:.0f}" for m in tenths))
        # the first tenth fills the allocator's per-thread arenas and the runtime's caches; a leak keeps growing after
        print(f"server RSS growth after the first tenth of the run: {(tenths[-1] - tenths[1]) / tenths[1]:+.1%}")


if __name__ == "__main__":
    main()
