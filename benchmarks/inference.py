"""Inference speed: `digitnet predict` with the ONNX model vs the checkpoint, and `digitnet serve` under load.

    python benchmarks/inference.py [--run DIR] [--images 10000] [--repeats 3] [--clients 20] [--requests 2000]

The model is a run dir of `python train.py` (its model.onnx and best checkpoint), or without
`--run` a `model=cnn` trained here for `--train-batches` batches of real MNIST (a few minutes on
two CPU cores). The images are the first `--images` of the MNIST test split (DIGITNET_DATA).

predict: `digitnet predict <model> images.npy --csv out.csv` as a user runs it, in its own process,
checkpoint and ONNX alternating, `--repeats` rounds; prints images/s of the whole command (median)
and of the model alone (loaded once, median), and the ONNX/checkpoint ratios.
serve: `digitnet serve model.onnx` on 127.0.0.1 (a free port), `--clients` concurrent keep-alive
clients posting the test images as the page does (a 280x280 canvas PNG, same-origin headers),
`--requests` in all; prints throughput, latency p50/p99 and the error count (non-200 answers).
"""

from __future__ import annotations

import argparse
import csv
import http.client
import io
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import NoReturn

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CANVAS = 280  # the page's canvas: 10 pixels per MNIST pixel


def fail(message: str) -> NoReturn:
    """Bad input: one line, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def train_model(folder: Path, batches: int) -> Path:
    """A short real `python train.py model=cnn` run without tracker or registry; its run dir."""
    run_dir = folder / "run"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "model=cnn",
        "trainer.max_epochs=1",
        f"trainer.limit_train_batches={batches}",
        "trainer.limit_val_batches=10",
        "test=false",
        "callbacks.onnx_export.test_images=1000",
        "logger=none",
        "registry.enabled=false",
        "print_config=false",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"training the benchmark model failed:\n{done.stderr[-3000:]}")
    return run_dir


def run_models(run_dir: Path) -> tuple[Path, Path]:
    """The run's checkpoint (the best one, as metrics.json names it) and its model.onnx."""
    metrics, onnx = run_dir / "metrics.json", run_dir / "model.onnx"
    checkpoint = json.loads(metrics.read_text()).get("best_checkpoint") if metrics.is_file() else None
    if not onnx.is_file() or not checkpoint or not Path(checkpoint).is_file():
        fail(
            f"{run_dir} is not a finished run dir with model.onnx and its best checkpoint; pass the dir of a "
            "`python train.py` run, or leave out --run to train one"
        )
    return Path(checkpoint), onnx


# ---------------------------------------------------------------------------- predict


def predict_once(model: Path, images: Path, out: Path, labels: np.ndarray) -> tuple[float, float]:
    """Seconds of one `digitnet predict` command and the accuracy of the predictions it wrote."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "digitnet.cli", "predict", str(model), str(images), "--csv", str(out)],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"digitnet predict {model} failed:\n{done.stderr[-3000:]}")
    with out.open() as f:
        predicted = [int(row["predicted"]) for row in csv.DictReader(f)]
    if len(predicted) != len(labels):
        raise SystemExit(f"digitnet predict wrote {len(predicted)} predictions for {len(labels)} images")
    return seconds, float((np.array(predicted) == labels).mean())


def model_speed(model: Path, x, repeats: int) -> float:
    """Images/s of the loaded model alone (what `digitnet predict` runs after reading its inputs), median."""
    from digitnet.classifier import load_classifier

    classifier = load_classifier(str(model))
    classifier.probabilities(x[:10])  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        classifier.probabilities(x)
        seconds.append(time.perf_counter() - start)
    return len(x) / statistics.median(seconds)


def bench_predict(models: dict[str, Path], images: np.ndarray, labels: np.ndarray, folder: Path, repeats: int) -> None:
    import torch

    path = folder / "test-images.npy"
    np.save(path, images)
    n = len(images)
    seconds: dict[str, list[float]] = {kind: [] for kind in models}
    for round_ in range(1, repeats + 1):
        for kind, model in models.items():
            s, accuracy = predict_once(model, path, folder / f"predictions-{kind}.csv", labels)
            seconds[kind].append(s)
            print(
                f"predict round {round_} {kind}: {n} images in {s:.2f} s = {n / s:.0f} images/s, "
                f"accuracy {accuracy:.2%}",
                flush=True,
            )
    command = {kind: n / statistics.median(s) for kind, s in seconds.items()}
    x = torch.from_numpy(images)[:, None].float() / 255
    alone = {kind: model_speed(model, x, repeats) for kind, model in models.items()}
    for name, speed in (("command", command), ("model alone", alone)):
        print(
            f"predict {name} images/s (median of {repeats}): checkpoint {speed['checkpoint']:.0f}, "
            f"onnx {speed['onnx']:.0f}; onnx/checkpoint {speed['onnx'] / speed['checkpoint']:.2f}x"
        )


# ---------------------------------------------------------------------------- serve


def canvas_png(digit: np.ndarray) -> bytes:
    """An MNIST digit as the page posts it: a transparent canvas whose alpha channel is the ink."""
    rgba = np.zeros((CANVAS, CANVAS, 4), np.uint8)
    rgba[..., 3] = np.asarray(Image.fromarray(digit).resize((CANVAS, CANVAS), Image.Resampling.BILINEAR))
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


class Load:
    """`clients` threads, each on its own keep-alive connection, posting bodies until all are sent."""

    def __init__(self, url: str, bodies: list[bytes], labels: np.ndarray):
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        # what the page's fetch() sends: the server refuses other origins
        self.headers = {
            "Content-Type": "image/png",
            "Origin": f"{parts.scheme}://{parts.netloc}",
            "Sec-Fetch-Site": "same-origin",
        }
        self.bodies, self.labels = bodies, labels
        self.next = itertools.count()
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.correct = 0

    def client(self) -> None:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=120)
        try:
            while (i := next(self.next)) < len(self.bodies):
                start = time.perf_counter()
                try:
                    connection.request("POST", "/api/predict", self.bodies[i], self.headers)
                    response = connection.getresponse()
                    answer = response.read()
                except (OSError, http.client.HTTPException) as err:
                    connection.close()  # reconnects on the next request
                    with self.lock:
                        self.errors.append(f"{type(err).__name__}: {err}")
                    continue
                latency = time.perf_counter() - start
                with self.lock:
                    if response.status != 200:
                        self.errors.append(f"{response.status}: {answer[:200]!r}")
                        continue
                    self.latencies.append(latency)
                    self.correct += json.loads(answer)["top"][0]["label"] == str(self.labels[i])
        finally:
            connection.close()

    def run(self, clients: int) -> float:
        threads = [threading.Thread(target=self.client) for _ in range(clients)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return time.perf_counter() - start


def bench_serve(onnx: Path, images: np.ndarray, labels: np.ndarray, folder: Path, clients: int, requests: int) -> None:
    picks = np.arange(requests) % len(images)
    bodies = [canvas_png(images[i]) for i in picks]
    log = folder / "serve.log"
    with log.open("w") as stderr:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "digitnet.cli",
                "serve",
                str(onnx),
                "--port",
                "0",
                "--collect-dir",
                str(folder / "collect"),
            ],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        line = server.stdout.readline()  # printed once the server listens
        if " on http://" not in line:
            raise SystemExit(f"digitnet serve did not start:\n{line}{log.read_text()[-3000:]}")
        url = line.split(" on ")[1].split()[0]
        Load(url, bodies[:clients], labels[picks]).run(clients)  # warm-up: every thread and the model once
        load = Load(url, bodies, labels[picks])
        seconds = load.run(clients)
    finally:
        server.terminate()
        server.wait(timeout=60)
    for error in load.errors[:5]:
        print(f"serve error: {error}", file=sys.stderr)
    ms = sorted(1000 * s for s in load.latencies) or [float("nan")]
    p50, p99 = (ms[min(len(ms) - 1, int(q * len(ms)))] for q in (0.50, 0.99))
    print(
        f"serve: {clients} clients, {requests} requests in {seconds:.2f} s = {requests / seconds:.1f} requests/s, "
        f"latency p50 {p50:.1f} ms, p99 {p99:.1f} ms, errors {len(load.errors)}, "
        f"accuracy {load.correct / max(1, len(load.latencies)):.2%}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a run dir of `python train.py` (default: train a model=cnn here)")
    parser.add_argument("--train-batches", type=int, default=200, help="training batches of the model made here")
    parser.add_argument("--images", type=int, default=10_000, help="MNIST test images predicted (at most 10000)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of each predict measurement")
    parser.add_argument("--clients", type=int, default=20, help="concurrent serve clients")
    parser.add_argument("--requests", type=int, default=2000, help="serve requests in all")
    args = parser.parse_args()
    if not 1 <= args.images <= 10_000 or min(args.repeats, args.clients, args.requests, args.train_batches) < 1:
        fail("--images must be in 1..10000; --repeats, --clients, --requests, --train-batches at least 1")

    from digitnet.data.idx import load_split
    from digitnet.errors import DigitnetError

    try:
        images, labels = load_split("mnist", "test", download=False)
    except DigitnetError as err:
        fail(str(err))
    images, labels = images[: args.images].numpy(), labels[: args.images].numpy()
    with tempfile.TemporaryDirectory(prefix="digitnet-inference-") as tmp:
        folder = Path(tmp)
        if args.run:
            run_dir = args.run
        else:
            print(f"training model=cnn for {args.train_batches} batches of MNIST ...", flush=True)
            run_dir = train_model(folder, args.train_batches)
        checkpoint, onnx = run_models(run_dir)
        print(f"models: {checkpoint.name} and {onnx.name} of one run", flush=True)
        bench_predict({"checkpoint": checkpoint, "onnx": onnx}, images, labels, folder, args.repeats)
        bench_serve(onnx, images, labels, folder, args.clients, args.requests)


if __name__ == "__main__":
    main()
