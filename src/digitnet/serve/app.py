"""The drawing pad's ASGI app: the page, live predictions from an ONNX model, and collecting drawings.

    GET  /               the page (index.html beside this file, no external resources)
    GET  /api/info       model, class names, where drawings go and how many each class has
    POST /api/predict    body: an image (the canvas as PNG) -> probabilities, top 3, the 28x28 input
    POST /api/collect?label=<class>   body: an image -> saved as <dataset>/<label>/<random id>.png

Uploads are checked before anything else happens: at most MAX_UPLOAD_BYTES, at most
MAX_PIXELS, an image format PIL reads, and a digit on it. Every refusal is a 4xx with a JSON
`{"error": ...}`. Files are only ever written below the dataset folder, under a label that is
one of the model's class names and a name the server makes up.
"""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from digitnet.errors import DigitnetError
from digitnet.atomic import write_atomically
from digitnet.classifier import Classifier
from digitnet.data.prepare import prepare_digit

MAX_UPLOAD_BYTES = 2_000_000
MAX_PIXELS = 2048 * 2048
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")  # what a browser or a phone sends; fewer decoders, fewer surprises
TOP_K = 3
PAGE = Path(__file__).with_name("index.html")


async def _body(request: Request) -> bytes:
    """The request body, refused with 413 as soon as it passes MAX_UPLOAD_BYTES (declared or streamed)."""
    too_big = HTTPException(413, f"upload larger than {MAX_UPLOAD_BYTES} bytes")
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit():
        raise HTTPException(400, f"bad Content-Length {declared!r}")
    if int(declared) > MAX_UPLOAD_BYTES:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_UPLOAD_BYTES:
            raise too_big
    if not body:
        raise HTTPException(400, "empty upload: send the drawing as the request body (image/png)")
    return bytes(body)


def decode_image(data: bytes) -> Image.Image:
    """A fully decoded image, or an HTTPException saying why not."""
    too_large = f"at most {MAX_PIXELS} pixels (2048x2048)"
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:  # PIL refuses headers claiming hundreds of megapixels itself
        raise HTTPException(413, f"image has far too many pixels; {too_large}") from None
    except (OSError, SyntaxError, ValueError, EOFError):  # PIL's ways of saying "not an image I can read"
        raise HTTPException(400, f"not a readable image (formats: {', '.join(FORMATS)})") from None
    if image.width * image.height > MAX_PIXELS:  # checked before decoding a single pixel
        raise HTTPException(413, f"image is {image.width}x{image.height}; {too_large}")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError):  # truncated or corrupt pixel data
        raise HTTPException(400, f"not a readable image (formats: {', '.join(FORMATS)})") from None
    return image


def _prepare(image: Image.Image) -> np.ndarray:
    try:
        return prepare_digit(image, "auto", "drawing")
    except DigitnetError as err:  # a blank canvas
        raise HTTPException(422, str(err)) from None


class DrawingPad:
    """The handlers, holding the model and the dataset folder."""

    def __init__(self, classifier: Classifier, dataset_dir: Path):
        self.classifier, self.dataset_dir = classifier, dataset_dir.resolve()
        self.shown_dir = str(dataset_dir)  # as the user gave it
        self.page = PAGE.read_text(encoding="utf-8")

    def counts(self) -> dict[str, int]:
        return {
            label: sum(1 for _ in (self.dataset_dir / label).glob("*.png")) if self._folder_safe(label) else 0
            for label in self.classifier.class_names
        }

    @staticmethod
    def _folder_safe(label: str) -> bool:
        return label not in ("", ".", "..") and not any(c in label for c in "/\\\0")

    async def index(self, request: Request) -> HTMLResponse:
        return HTMLResponse(self.page)

    async def info(self, request: Request) -> JSONResponse:
        c = self.classifier
        return JSONResponse({"model": c.source, "dataset": c.data_name, "classes": c.class_names,
                             "collect_dir": self.shown_dir, "counts": self.counts()})

    async def predict(self, request: Request) -> JSONResponse:
        image = decode_image(await _body(request))
        return JSONResponse(await run_in_threadpool(self._predict, image))

    def _predict(self, image: Image.Image) -> dict:
        seen = _prepare(image)
        probs = self.classifier.probabilities(torch.from_numpy(seen)[None, None].float() / 255)[0]
        top = probs.topk(min(TOP_K, len(probs)))
        names = self.classifier.class_names
        return {
            "top": [{"label": names[i], "probability": p} for p, i in zip(top.values.tolist(), top.indices.tolist())],
            "probabilities": probs.tolist(),
            "image": seen.flatten().tolist(),  # 784 values, row by row: what the model saw
        }

    async def collect(self, request: Request) -> JSONResponse:
        label = request.query_params.get("label", "")
        if label not in self.classifier.class_names:
            raise HTTPException(400, f"label {label!r} is not one of the model's classes {self.classifier.class_names}")
        if not self._folder_safe(label):
            raise HTTPException(400, f"label {label!r} cannot be a folder name")
        image = decode_image(await _body(request))
        saved = await run_in_threadpool(self._save, image, label)
        return JSONResponse({"saved": str(saved.relative_to(self.dataset_dir)), "label": label,
                             "counts": self.counts()}, status_code=201)

    def _save(self, image: Image.Image, label: str) -> Path:
        _prepare(image)  # a blank drawing would later stop data=custom training
        folder = self.dataset_dir / label
        path = folder / f"{uuid.uuid4().hex}.png"
        if not path.resolve().is_relative_to(self.dataset_dir):  # e.g. the label folder is a symlink out
            raise HTTPException(400, f"label folder {folder} leads outside the dataset folder")
        if image.mode not in ("L", "LA", "RGB", "RGBA"):  # palette, CMYK, 16-bit...: keep what prepare_digit saw
            image = image.convert("RGBA")
        # re-encoded from the decoded pixels: the bytes users sent are never written as they are
        write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))
        return path


async def _error(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code)


def create_app(classifier: Classifier, dataset_dir: str | Path) -> Starlette:
    """The app serving `classifier`; collected drawings go to `dataset_dir`/<label>/."""
    pad = DrawingPad(classifier, Path(dataset_dir))
    routes = [
        Route("/", pad.index),
        Route("/api/info", pad.info),
        Route("/api/predict", pad.predict, methods=["POST"]),
        Route("/api/collect", pad.collect, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: _error})
