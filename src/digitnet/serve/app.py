"""The drawing pad's ASGI app: the page, live predictions from an ONNX model, and collecting drawings.

    GET  /               the page (index.html beside this file, no external resources)
    GET  /api/info       model, class names, the collect folder and how many drawings each class has
    POST /api/predict    body: an image (the canvas as PNG) -> probabilities, top 3, the 28x28 input
    POST /api/collect?label=<class>   body: an image -> saved as <collect folder>/<label>/<random id>.png

Only the pad's own page can use the API from a browser. Requests must name an allowed host (a
DNS-rebinding page reaches 127.0.0.1 under its own name), and a POST must send an image content
type (a cross-origin page can send only text/plain and form types without a CORS preflight, which
this server never grants) and must not come from another origin (Origin, Sec-Fetch-Site). Scripts
such as curl send neither header and keep working. /api/info shows paths relative to the
current folder, never absolute ones.

Uploads are checked before anything else happens: at most MAX_UPLOAD_BYTES, at most
MAX_PIXELS, an image format PIL reads, and a digit on it. Every refusal is a 4xx with a JSON
`{"error": ...}`. Files are only ever written below the collect folder, under a label that is
one of the model's class names and a name the server makes up.
"""

from __future__ import annotations

import io
import logging
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import numpy as np
import torch
from PIL import Image
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from digitnet.atomic import WriteError, write_atomically
from digitnet.classifier import Classifier
from digitnet.data.prepare import prepare_digit
from digitnet.errors import DigitnetError

MAX_UPLOAD_BYTES = 2_000_000
MAX_PIXELS = 2048 * 2048
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")  # what a browser or a phone sends; fewer decoders, fewer surprises
CONTENT_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp", "image/gif")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
# uploads read, decoded and run through the model at once: a 2048x2048 one takes over 100 MB while prepared.
# The others wait unread (uvicorn stops reading a connection whose buffer is full), so many clients sending
# large images hold no more than WORKERS bodies in memory.
WORKERS = 2
TOP_K = 3
PAGE = Path(__file__).with_name("index.html")
log = logging.getLogger("uvicorn.error")  # printed the way uvicorn prints its own warnings


def shown_path(path: str | Path) -> str:
    """`path` as the page may show it: relative to the current folder, else its name alone."""
    path = Path(path)
    if not path.is_absolute():
        return str(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return path.name


def _same_origin(request: Request) -> None:
    """Refuse a request that a browser marks as coming from another origin (the pad's page sends same-origin ones)."""
    site = request.headers.get("sec-fetch-site", "same-origin")
    origin = request.headers.get("origin")
    if site != "same-origin" or (origin is not None and urlsplit(origin).netloc != request.headers.get("host")):
        raise HTTPException(403, "cross-origin requests are refused: use the page this server serves")


def _image_content_type(request: Request) -> None:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in CONTENT_TYPES:
        raise HTTPException(415, f"send the image with Content-Type {', '.join(CONTENT_TYPES)}, not {content_type!r}")


def _too_big() -> HTTPException:
    return HTTPException(413, f"upload larger than {MAX_UPLOAD_BYTES} bytes")


def _check_upload_headers(request: Request) -> None:
    """Refuse what the headers already show: another origin, not an image, a declared size over the cap."""
    _same_origin(request)
    _image_content_type(request)
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit():
        raise HTTPException(400, f"bad Content-Length {declared!r}")
    if int(declared) > MAX_UPLOAD_BYTES:
        raise _too_big()


async def _read_upload(request: Request) -> bytes:
    """The body, refused with 413 as soon as it passes MAX_UPLOAD_BYTES."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_UPLOAD_BYTES:
            raise _too_big()
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
    """The handlers, holding the model and the collect folder."""

    def __init__(self, classifier: Classifier, collect_dir: Path):
        self.classifier, self.collect_dir = classifier, collect_dir.resolve()
        self.shown_dir = shown_path(collect_dir)
        self.page = PAGE.read_text(encoding="utf-8")
        self.workers = anyio.CapacityLimiter(WORKERS)

    def counts(self) -> dict[str, int]:
        return {
            label: sum(1 for _ in (self.collect_dir / label).glob("*.png")) if self._folder_safe(label) else 0
            for label in self.classifier.class_names
        }

    @staticmethod
    def _folder_safe(label: str) -> bool:
        return label not in ("", ".", "..") and not any(c in label for c in "/\\\0")

    async def _work(self, request: Request, function, *args):
        """`function(upload, *args)` in a worker thread; the upload is read only once one of the WORKERS
        slots is free, and the slot is held until `function` returns: bounds the memory of many uploads."""
        _check_upload_headers(request)
        async with self.workers:
            return await anyio.to_thread.run_sync(function, await _read_upload(request), *args)

    async def index(self, request: Request) -> HTMLResponse:
        # no other site may show the pad in a frame and trick clicks on its Collect buttons
        return HTMLResponse(self.page, headers={"Content-Security-Policy": "frame-ancestors 'none'"})

    async def info(self, request: Request) -> JSONResponse:
        c = self.classifier
        return JSONResponse(
            {
                "model": shown_path(c.source),
                "dataset": c.data_name,
                "classes": c.class_names,
                "collect_dir": self.shown_dir,
                "counts": self.counts(),
            }
        )

    async def predict(self, request: Request) -> JSONResponse:
        return JSONResponse(await self._work(request, self._predict))

    def _predict(self, data: bytes) -> dict:
        seen = _prepare(decode_image(data))
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
        saved = await self._work(request, self._save, label)
        return JSONResponse(
            {"saved": str(saved.relative_to(self.collect_dir)), "label": label, "counts": self.counts()},
            status_code=201,
        )

    def _save(self, data: bytes, label: str) -> Path:
        image = decode_image(data)
        _prepare(image)  # a blank drawing would later stop data=custom training
        folder = self.collect_dir / label
        path = folder / f"{uuid.uuid4().hex}.png"
        if not path.resolve().is_relative_to(self.collect_dir):  # e.g. the label folder is a symlink out
            raise HTTPException(400, f"label folder {label} leads outside the collect folder")
        if image.mode not in ("L", "LA", "RGB", "RGBA"):  # palette, CMYK, 16-bit...: keep what prepare_digit saw
            image = image.convert("RGBA")
        try:  # re-encoded from the decoded pixels: the bytes users sent are never written as they are
            write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))
        except WriteError as err:
            log.warning("cannot save a drawing in %s: %s", folder, err.reason)
            raise HTTPException(500, f"cannot save in {self.shown_dir}/{label}: {err.reason}") from None
        return path


async def _error(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code)


async def _disconnected(request: Request, exc: ClientDisconnect) -> Response:
    log.warning("a client left during its upload to %s; nothing saved", request.url.path)
    return Response(status_code=400)  # nobody is left to read it


def create_app(
    classifier: Classifier, collect_dir: str | Path, allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
) -> Starlette:
    """The app serving `classifier` to requests naming one of `allowed_hosts`; drawings go to `collect_dir`/<label>/."""
    pad = DrawingPad(classifier, Path(collect_dir))
    routes = [
        Route("/", pad.index),
        Route("/api/info", pad.info),
        Route("/api/predict", pad.predict, methods=["POST"]),
        Route("/api/collect", pad.collect, methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={HTTPException: _error, ClientDisconnect: _disconnected},
        middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts, www_redirect=False)],
    )
