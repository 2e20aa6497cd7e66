"""Load test of `inpformer serve`: N concurrent clients POST one image each, again and again, for T seconds (or
until R requests); prints requests/s, p50/p95/p99 latency and the errors.

    python benchmarks/serve_load.py runs/demo --clients 16 --seconds 20        # starts a server on loopback
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --image part.png
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
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
    args = parser.parse_args()
    if bool(args.model) == bool(args.url):
        parser.error("give either RUN_DIR (to start a server) or --url")

    image = Path(args.image).read_bytes() if args.image else generated_png(256)
    server = None
    try:
        if args.model:
            server, url = start_server(args.model, args.runtime, args.workers, args.max_batch)
        else:
            url = args.url.rstrip("/")
        latencies, errors, elapsed = asyncio.run(load(url, image, args))
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    report(latencies, errors, elapsed, args.clients)


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


async def load(url: str, image: bytes, args: argparse.Namespace) -> tuple[list[float], collections.Counter, float]:
    """Latencies (s) of the successful requests, error counts by status or exception, and the elapsed time."""
    headers = {"content-type": "application/octet-stream", **({"X-API-Key": args.api_key} if args.api_key else {})}
    params = {"overlay": "true"} if args.overlay else {}
    latencies: list[float] = []
    errors: collections.Counter = collections.Counter()
    sent = 0
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as client:
        warm_up = await client.post("/predict", content=image, params=params)  # first call may compile / allocate
        warm_up.raise_for_status()
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
        return latencies, errors, time.perf_counter() - start


def report(latencies: list[float], errors: collections.Counter, elapsed: float, clients: int) -> None:
    total = len(latencies) + sum(errors.values())
    print(f"{clients} clients, {elapsed:.1f} s: {total} requests, {len(latencies) / elapsed:.1f} successful requests/s")
    if latencies:
        p50, p95, p99 = np.percentile(np.asarray(latencies) * 1000, [50, 95, 99])
        print(f"latency ms: p50 {p50:.1f}  p95 {p95:.1f}  p99 {p99:.1f}  max {max(latencies) * 1000:.1f}")
    print(f"errors: {sum(errors.values())}" + (f" ({dict(errors)})" if errors else ""))


if __name__ == "__main__":
    main()
