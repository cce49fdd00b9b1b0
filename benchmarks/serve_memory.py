"""Resident memory of `digitnet serve` while many clients upload maximum-size drawings at once.

    python benchmarks/serve_memory.py <model> [--clients 20] [--requests 5]

Starts the server on 127.0.0.1 (a free port), has every client send `--requests` maximum-size
drawings (2048x2048 RGBA PNG, just under the 2 MB upload cap) to /api/predict at the same time,
and prints the server's resident memory before, at its peak (the kernel's VmHWM) and after,
with the status codes it answered. Loopback only, a bounded number of requests.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import io
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIDE = 2048  # the server's pixel cap is 2048x2048
MAX_BYTES = 2_000_000


def max_size_drawing() -> bytes:
    """A thick 7 in the alpha channel (the ink, as the page draws it) and noise in the colour
    channels under it, as many rows as keep the PNG under the byte cap."""
    alpha = Image.new("L", (SIDE, SIDE))
    ImageDraw.Draw(alpha).line([(500, 400), (1500, 400), (800, 1700)], fill=255, width=160)
    rgb = np.zeros((SIDE, SIDE, 3), np.uint8)
    rgb[:280] = np.random.default_rng(0).integers(0, 256, (280, SIDE, 3), dtype=np.uint8)
    image = Image.fromarray(np.dstack([rgb, np.asarray(alpha)]), "RGBA")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert len(buffer.getvalue()) < MAX_BYTES, len(buffer.getvalue())
    return buffer.getvalue()


def memory_kb(pid: int) -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


def mb(kb: int) -> str:
    return f"{kb / 1024:.0f} MB"


def client(url: str, body: bytes, requests: int, statuses: collections.Counter) -> None:
    parts = urllib.parse.urlsplit(url)
    for _ in range(requests):
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
        try:
            connection.request("POST", "/api/predict", body, {"Content-Type": "image/png"})
            response = connection.getresponse()
            response.read()
            statuses[response.status] += 1
        except OSError as err:
            statuses[type(err).__name__] += 1
        finally:
            connection.close()


def wait_until_listening(url: str) -> None:
    """Needed for servers older than this script, which printed their address before listening."""
    parts = urllib.parse.urlsplit(url)
    for _ in range(600):
        try:
            socket.create_connection((parts.hostname, parts.port), timeout=10).close()
            return
        except ConnectionRefusedError:
            time.sleep(0.1)
    raise SystemExit(f"the server at {url} does not accept connections")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="what `digitnet serve` gets: an .onnx file or a run dir")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=5, help="uploads per client")
    args = parser.parse_args()

    body = max_size_drawing()
    server = subprocess.Popen(
        [sys.executable, "-m", "digitnet.cli", "serve", args.model, "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        url = server.stdout.readline().split(" on ")[1].split()[0]
        statuses: collections.Counter = collections.Counter()
        wait_until_listening(url)
        client(url, body, 1, statuses)  # warm up: the model and the decoders are loaded
        before = memory_kb(server.pid)
        threads = [
            threading.Thread(target=client, args=(url, body, args.requests, statuses)) for _ in range(args.clients)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        after = memory_kb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"{args.clients} clients x {args.requests} uploads of {len(body)} bytes ({SIDE}x{SIDE} RGBA PNG)")
    print(f"server RSS: {mb(before['VmRSS'])} before, peak {mb(after['VmHWM'])}, {mb(after['VmRSS'])} after")
    print("statuses:", dict(statuses))


if __name__ == "__main__":
    main()
