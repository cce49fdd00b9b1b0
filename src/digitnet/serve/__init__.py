"""`digitnet serve <model>`: a drawing pad in the browser with live predictions, and a collect mode.

The model is an ONNX file, a run dir (its model.onnx) or a registry model (`best`,
`best:<dataset>`, an id): the server runs onnxruntime on exactly the file the exercise would
get. Drawings saved on the page go to `--collect-dir` (default `data/custom` under the current
folder, never the dataset store `$DIGITNET_DATA`), `<label>/<random id>.png`, ready for `data=custom`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
from pathlib import Path

import uvicorn

from digitnet.atomic import unwritable
from digitnet.classifier import Classifier, classifier_from_onnx
from digitnet.data.folder import FOLDER
from digitnet.errors import DigitnetError
from digitnet.serve.app import LOOPBACK_HOSTS, create_app

DEFAULT_COLLECT_DIR = Path("data") / FOLDER  # where `python train.py data=custom` looks by default


def load_onnx_classifier(spec: str, registry_url: str | None = None) -> Classifier:
    """An ONNX file, a run dir holding model.onnx, or a registry model's ONNX."""
    path = Path(spec)
    if path.is_dir():
        path = path / "model.onnx"
        if not path.is_file():
            raise DigitnetError(f"{spec} has no model.onnx; export one with `digitnet export <checkpoint> -o {path}`")
    if path.is_file():
        if path.suffix != ".onnx":
            raise DigitnetError(
                f"{spec} is not an .onnx file; the server runs the exported model: pass a run dir, "
                "its model.onnx, or `digitnet export` the checkpoint first"
            )
        return classifier_from_onnx(path, str(path))
    if path.suffix in (".onnx", ".ckpt") or os.sep in spec:
        raise DigitnetError(f"model {spec} not found")
    return _registry_classifier(spec, registry_url)


def _registry_classifier(spec: str, registry_url: str | None) -> Classifier:
    from digitnet.registry import Registry

    with Registry(registry_url) as registry:
        if spec == "best" or spec.startswith("best:"):
            record = registry.best("test/acc", dataset=spec[5:] or None)
        else:
            record = registry.get(spec)
        record = registry.get(record.id, with_onnx=True)
    if not record.onnx:
        raise DigitnetError(f"registry model {record.id[:8]} has no ONNX model stored; serve its run dir's model.onnx")
    return classifier_from_onnx(record.onnx, f"registry model {record.id[:8]} ({record.model}, {record.dataset})")


def _bind(host: str, port: int) -> socket.socket:
    """A socket listening on host:port: browsers may connect as soon as the address is printed."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise DigitnetError(f"cannot listen on {host}:{port} ({err.strerror}); pick another --port") from None
    return sock


def check_collect_dir(folder: Path) -> None:
    """Refuse a collect folder this user cannot write, before any drawing is lost (it is made on the first save)."""
    blocker = unwritable(folder)
    if blocker is not None:
        raise DigitnetError(
            f"cannot save drawings in {folder}: {blocker} is not a folder you can write; "
            "pass --collect-dir <a folder of yours>"
        )


def allowed_hosts(host: str, named: list[str]) -> tuple[str, ...]:
    """The Host names requests may carry: this machine's, the listening address, and the ones the user named."""
    if host in ("0.0.0.0", "::", "") and not named:
        raise DigitnetError(
            f"--host {host or repr(host)} opens the pad to the network: name the host names or "
            "addresses its users open it by with --allowed-host (repeatable)"
        )
    listening = f"[{host}]" if ":" in host else host
    return tuple(dict.fromkeys([*LOOPBACK_HOSTS, listening, *named]))


def training_hint(folder: Path) -> str:
    if folder.name != FOLDER:
        return f"data=custom reads <root>/{FOLDER}/<label>/: move the label folders there to train on them"
    return f"train on them with `DIGITNET_DATA={shlex.quote(str(folder.parent))} python train.py data=custom`"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="digitnet serve",
        description="A drawing pad in the browser: draw a digit, see the model's top-3 live, and save "
        "labelled drawings into <collect dir>/<label>/ for `python train.py data=custom`.",
    )
    parser.add_argument(
        "model", help="an .onnx file, a run dir (its model.onnx), a registry id, 'best' or 'best:<dataset>'"
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name or address users open the pad by, besides localhost and --host "
        "(repeatable; required with --host 0.0.0.0)",
    )
    parser.add_argument(
        "--collect-dir",
        type=Path,
        default=DEFAULT_COLLECT_DIR,
        help=f"where drawings go: <collect dir>/<label>/ (default {DEFAULT_COLLECT_DIR}, under the current folder)",
    )
    parser.add_argument(
        "--db", help="registry URL for ids and 'best' (default: env DIGITNET_REGISTRY or outputs/registry.db)"
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise DigitnetError(f"--port {args.port} must be between 0 and 65535")
    hosts = allowed_hosts(args.host, args.allowed_host)
    check_collect_dir(args.collect_dir)

    classifier = load_onnx_classifier(args.model, args.db)
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {classifier.source} on http://{shown}:{port}/  (Ctrl-C stops)", flush=True)
    print(
        f"drawings are saved in {args.collect_dir.absolute()}/<label>/; {training_hint(args.collect_dir)}", flush=True
    )
    app = create_app(classifier, args.collect_dir, hosts)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])
    return 0
