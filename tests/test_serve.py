"""`digitnet serve`: the page in headless Chromium, live predictions, collecting drawings, training on
them, bad uploads."""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import io
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from conftest import REPO, compose_config
from digitnet import cli
from digitnet.data.idx import load_split
from digitnet.data.prepare import prepare_digit
from digitnet.serve import load_onnx_classifier

pytestmark = pytest.mark.slow  # a 200-batch model, a server process and many clients

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # host names of this machine, as a DNS-rebinding page and a user's --allowed-host name would resolve
    "--host-resolver-rules=MAP rebound.test 127.0.0.1, MAP pad.test 127.0.0.1",
]
SCALE = 10  # canvas pixels per MNIST pixel: the page's canvas is 280x280
QUIET = ("debug=test",)


@dataclass
class ServedModel:
    run_dir: Path
    checkpoint: Path
    registry_url: str


@dataclass
class Server:
    url: str
    dataset_dir: Path  # the collect folder, <data root>/custom
    log: Path  # the server's stderr

    def console(self) -> str:
        return self.log.read_text()


@pytest.fixture(scope="module")
def served_model(real_data, tmp_path_factory) -> ServedModel:
    """An MLP trained for 200 batches of real MNIST with light augmentation (about 94%), exported to ONNX."""
    from digitnet.train import train

    root = tmp_path_factory.mktemp("serve_model")
    url = f"sqlite:///{root / 'registry.db'}"
    cfg = compose_config(
        "model=mlp",
        "aug=light",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=200",
        "trainer.limit_val_batches=2",
        "callbacks.onnx_export.test_images=1000",
        *QUIET,
        f"registry.url={url}",
        output_dir=root / "run",
    )
    train(cfg)
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    return ServedModel(root / "run", Path(metrics["best_checkpoint"]), url)


def _start_server(cwd: Path, *args: str, env: dict | None = None):
    """`digitnet serve <args> --port 0` in its own process in `cwd`, as a user starts it: the Server and its process."""
    log = cwd / f"serve-{len(list(cwd.glob('serve-*.log')))}.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "digitnet.cli", "serve", *args, "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            cwd=cwd,
            env=env,
        )
    line = proc.stdout.readline()  # "serving <model> on http://127.0.0.1:<port>/ ..." once it listens
    if "http://" not in line:
        proc.kill()
        pytest.fail(f"server did not start: {line}{log.read_text()}")
    collect_line = proc.stdout.readline()  # "drawings are saved in <absolute folder>/<label>/; ..."
    folder = Path(collect_line.removeprefix("drawings are saved in ").split("/<label>/")[0])
    return Server(line.split(" on ")[1].split()[0], folder, log), proc


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(served_model):
    """`digitnet serve run --collect-dir drawings/custom` (relative paths, so the page and its
    screenshot show the same text in every test run)."""
    server, proc = _start_server(served_model.run_dir.parent, "run", "--collect-dir", "drawings/custom")
    assert server.dataset_dir == served_model.run_dir.parent / "drawings" / "custom"
    yield server
    _stop(proc)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1000, "height": 560})
    page.goto(server.url)
    page.wait_for_selector("body[data-ready=true]")
    yield page
    page.close()


@pytest.fixture(scope="module")
def mnist_test(real_data):
    images, labels = load_split("mnist", "test")
    return images.numpy(), labels.numpy()


def _strokes(digit: np.ndarray) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """The digit traced as horizontal strokes over each run of inked pixels, in canvas coordinates.

    The round pen (2 MNIST pixels wide) reaches half a pixel past each end, so a run's ends are
    drawn half a pixel inwards: the traced digit is about as bold as the original.
    """
    strokes = []
    for row, values in enumerate(digit > 100):
        cols = np.flatnonzero(values)
        for run in np.split(cols, np.flatnonzero(np.diff(cols) > 1) + 1) if len(cols) else []:
            y = (row + 0.5) * SCALE
            x0, x1 = float(run[0] + 1) * SCALE, float(run[-1]) * SCALE
            strokes.append(((x0, y), (x1, y)) if x0 < x1 else (((x0 + x1) / 2, y),) * 2)
    return strokes


def _draw(page, strokes) -> None:
    box = page.locator("#pad").bounding_box()
    for (x0, y0), (x1, y1) in strokes:
        page.mouse.move(box["x"] + x0, box["y"] + y0)
        page.mouse.down()
        page.mouse.move(box["x"] + x1, box["y"] + y1, steps=3)
        page.mouse.up()
    page.wait_for_selector("body[data-state=idle]")


def _shown(page) -> dict:
    """What the page shows: the big prediction, the top-3 rows and the 28x28 input it drew."""
    return page.evaluate("""() => ({
        prediction: document.querySelector('#prediction').textContent,
        top: [...document.querySelectorAll('#top3 li')].map(li => [li.querySelector('.label').textContent,
                                                                      li.querySelector('.prob').textContent]),
        seen: Array.from(document.querySelector('#seen').getContext('2d').getImageData(0, 0, 28, 28).data)
                   .filter((_, i) => i % 4 == 0),
    })""")


def _first(mnist_test, label: int) -> np.ndarray:
    images, labels = mnist_test
    return images[np.flatnonzero(labels == label)[0]]


@pytest.mark.browser
def test_drawing_a_digit_shows_the_right_prediction(page, mnist_test):
    for label in (7, 2):
        page.click("#clear")
        _draw(page, _strokes(_first(mnist_test, label)))
        shown = _shown(page)
        assert shown["prediction"] == str(label)
        assert [row[0] for row in shown["top"]][0] == str(label) and len({row[0] for row in shown["top"]}) == 3
        probs = [float(row[1].rstrip("%")) for row in shown["top"]]
        assert probs == sorted(probs, reverse=True) and 50 < probs[0] <= 100 and sum(probs) <= 100.1
        seen = np.array(shown["seen"]).reshape(28, 28)
        assert seen.max() == 255 and 50 < (seen > 0).sum() < 400  # an MNIST-like digit, not a blank or full frame
    _save_screenshot(page.screenshot(), REPO / "docs" / "serve.png")  # the docs' picture of the page


def _save_screenshot(png: bytes, path: Path) -> None:
    """Write `png` unless `path` already looks the same: Chromium antialiases the strokes a few
    pixels differently from run to run, which should not leave a changed file in the checkout."""
    if path.exists():
        old, new = (np.asarray(Image.open(io.BytesIO(b)).convert("L"), dtype=int) for b in (path.read_bytes(), png))
        if old.shape == new.shape and (old != new).mean() < 1e-3:
            return
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(png)


@pytest.mark.browser
def test_undo_and_clear(page, mnist_test):
    _draw(page, _strokes(_first(mnist_test, 7)))
    before = _shown(page)
    _draw(page, [((20, 260), (260, 30))])  # a long stray slash changes what the model sees
    assert _shown(page)["seen"] != before["seen"]
    page.click("#undo")
    page.wait_for_selector("body[data-state=idle]")
    assert _shown(page) == before
    page.keyboard.press("Escape")
    page.wait_for_selector("body[data-state=idle]")
    cleared = _shown(page)
    assert cleared["prediction"] == "" and not any(cleared["seen"]) and all(row == ["", ""] for row in cleared["top"])


@pytest.mark.browser
def test_touch_draws_too(browser, server):
    context = browser.new_context(has_touch=True, viewport={"width": 400, "height": 800})
    page = context.new_page()
    page.goto(server.url)
    page.wait_for_selector("body[data-ready=true]")
    box = page.locator("#pad").bounding_box()
    page.touchscreen.tap(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)  # a dot
    page.wait_for_selector("body[data-state=idle]")
    shown = _shown(page)
    assert shown["prediction"] in [str(i) for i in range(10)] and max(shown["seen"]) == 255
    context.close()


@pytest.mark.browser
def test_collect_saves_the_drawing_the_model_saw(page, server, mnist_test):
    _draw(page, _strokes(_first(mnist_test, 4)))
    seen = np.array(_shown(page)["seen"]).reshape(28, 28)
    before = set((server.dataset_dir / "4").glob("*.png"))
    page.click("#labels button[data-label='4']")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('saved')")
    (saved,) = set((server.dataset_dir / "4").glob("*.png")) - before
    with Image.open(saved) as image:
        assert (image.format, image.mode, image.size) == ("PNG", "RGBA", (280, 280))
        assert np.array_equal(prepare_digit(image), seen)
    assert page.locator("#labels button[data-label='4'] small").text_content() == str(len(before) + 1)
    page.wait_for_selector("body[data-state=idle]")
    assert _shown(page)["prediction"] == ""  # the pad is cleared for the next drawing


# ---------------------------------------------------------------------------- the HTTP API


def _post(url: str, body: bytes, content_type: str = "image/png", headers: dict | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": content_type, **(headers or {})}
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _post_declaring(url: str, length: int) -> tuple[int, dict]:
    """A POST whose headers declare `length` bytes and that waits for the answer before sending any.

    The server refuses an oversized declaration without reading the body; a client still writing
    a real body then can have its connection reset before it reads the 413."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.putrequest("POST", parts.path)
        connection.putheader("Content-Type", "image/png")
        connection.putheader("Content-Length", str(length))
        connection.endheaders()
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _canvas_png(digit: np.ndarray, size: int = 280) -> bytes:
    """An MNIST digit as the page sends it: a transparent canvas whose alpha channel is the ink."""
    alpha = np.asarray(Image.fromarray(digit).resize((size, size), Image.Resampling.BILINEAR))
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[..., 3] = alpha
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge image (a 'decompression bomb'), with no pixel data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    )


def _tree(folder: Path) -> set[Path]:
    return {p for p in folder.parent.rglob("*")}


def test_bad_uploads_get_4xx_with_a_message_and_write_nothing(server, mnist_test):
    digit = _canvas_png(_first(mnist_test, 3))
    before = _tree(server.dataset_dir)
    cases = [
        ("api/predict", b"", 400, "empty upload"),
        ("api/predict", b"not an image at all", 400, "not a readable image"),
        ("api/predict", digit[: len(digit) // 2], 400, "not a readable image"),  # truncated PNG
        ("api/predict", _png(Image.new("L", (3000, 3000))), 413, "3000x3000"),
        ("api/predict", _png_claiming(50_000, 50_000), 413, "far too many pixels"),
        ("api/predict", _png(Image.new("RGBA", (280, 280))), 422, "no digit found"),  # a blank canvas
        ("api/collect?label=7", _png(Image.new("RGBA", (280, 280))), 422, "no digit found"),
        ("api/collect?label=../7", digit, 400, "is not one of the model's classes"),
        ("api/collect?label=", digit, 400, "is not one of the model's classes"),
        ("api/collect?label=%2Ftmp", digit, 400, "is not one of the model's classes"),
        ("api/collect?label=3", b"GIF89a broken", 400, "not a readable image"),
    ]
    for path, body, status, message in cases:
        code, answer = _post(server.url + path, body)
        assert (code, message in answer["error"]) == (status, True), (path, code, answer)
    code, answer = _post_declaring(server.url + "api/predict", 2_000_001)
    assert (code, "larger than 2000000 bytes" in answer["error"]) == (413, True), answer
    assert _tree(server.dataset_dir) == before


def test_predict_answers_probabilities_top3_and_the_prepared_image(server, served_model, mnist_test):
    digit = _first(mnist_test, 0)
    code, answer = _post(server.url + "api/predict", _canvas_png(digit))
    assert code == 200 and answer["top"][0]["label"] == "0"
    assert abs(sum(answer["probabilities"]) - 1) < 1e-4 and len(answer["probabilities"]) == 10
    assert [t["probability"] for t in answer["top"]] == sorted(answer["probabilities"], reverse=True)[:3]
    seen = np.array(answer["image"], dtype=np.uint8).reshape(28, 28)
    assert np.corrcoef(seen.ravel().astype(float), digit.ravel().astype(float))[0, 1] > 0.9  # MNIST-like again
    with urllib.request.urlopen(server.url + "api/info", timeout=30) as response:
        info = json.loads(response.read())
    assert info["classes"] == [str(i) for i in range(10)] and info["dataset"] == "mnist"
    assert (info["model"], info["collect_dir"]) == ("run/model.onnx", "drawings/custom")


def test_collected_drawings_train_a_custom_model_that_exports(server, served_model, mnist_test, tmp_path, monkeypatch):
    """10 drawings per class through the API, then `data=custom init_from=<MNIST checkpoint>` for one epoch."""
    from digitnet.train import train

    images, labels = mnist_test
    for label in range(10):
        for index in np.flatnonzero(labels == label)[-10:]:  # digits the browser tests did not draw
            code, answer = _post(f"{server.url}api/collect?label={label}", _canvas_png(images[index], size=256))
            assert code == 201 and answer["saved"].startswith(f"{label}/"), answer
    assert all(answer["counts"][str(k)] >= 10 for k in range(10))

    monkeypatch.setenv("DIGITNET_DATA", str(server.dataset_dir.parent))
    cfg = compose_config(
        "data=custom",
        "model=mlp",
        "aug=light",
        "optim.lr=3e-4",
        "trainer.max_epochs=1",
        f"init_from='{served_model.checkpoint}'",
        "registry.enabled=false",
        *QUIET,
        output_dir=tmp_path / "run",
    )
    train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    test_images, _ = load_split("custom", "test")
    assert metrics["onnx/test_images"] == len(test_images) >= 20  # verified on the custom test split
    assert metrics["onnx/test_acc"] == metrics["onnx/torch_test_acc"] == pytest.approx(metrics["test/acc"])
    # the MNIST model's knowledge carried over: a few steps on 80 drawings from scratch stay near chance (0.1)
    assert metrics["test/acc"] >= 0.6
    model = onnx.load(tmp_path / "run" / "model.onnx")
    assert {p.key: p.value for p in model.metadata_props}["dataset"] == "custom"
    classifier = load_onnx_classifier(str(tmp_path / "run"))  # what `digitnet serve <that run>` loads
    probs = classifier.probabilities(test_images[:, None].float())
    assert probs.shape == (len(test_images), 10) and torch.allclose(
        probs.sum(1), torch.ones(len(test_images)), atol=1e-4
    )


# ---------------------------------------------------------------------------- who may use the pad

ATTACK_PAGE = """<!doctype html><title>any page on the web</title><pre id="results"></pre><script>
const pad = new URLSearchParams(location.search).get("pad");
document.body.insertAdjacentHTML("beforeend", `<iframe src="${pad}"></iframe>`);
const png = Uint8Array.from(atob("%s"), c => c.charCodeAt(0));
const post = options => fetch(pad + "api/collect?label=8", {method: "POST", ...options})
  .then(r => r.type + " " + r.status, e => "failed: " + e.name);
(async () => {
  const results = {
    no_cors_text: await post({mode: "no-cors", body: new Blob([png], {type: "text/plain"})}),
    no_cors_png: await post({mode: "no-cors", body: new Blob([png], {type: "image/png"})}),
    cors_png: await post({body: png, headers: {"Content-Type": "image/png"}}),
  };
  document.getElementById("results").textContent = JSON.stringify(results);
})();
</script>"""


@pytest.fixture
def attacker(mnist_test):
    """Another web server on this machine (another port: another origin) serving a page that posts an 8 to the pad."""
    page = (ATTACK_PAGE % base64.b64encode(_canvas_png(_first(mnist_test, 8))).decode()).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Handler) as httpd:
        thread = threading.Thread(target=httpd.serve_forever)
        thread.start()
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
        httpd.shutdown()
        thread.join()


@pytest.mark.browser
def test_another_origins_page_cannot_collect(browser, server, attacker):
    before = _tree(server.dataset_dir)
    page = browser.new_page()
    page.goto(f"{attacker}?pad={urllib.parse.quote(server.url)}")
    page.wait_for_function("document.querySelector('#results').textContent")
    results = json.loads(page.text_content("#results"))
    framed = page.frames[1]
    framed.wait_for_load_state()
    pad_in_frame = framed.evaluate("document.getElementById('pad') !== null")
    page.close()
    # no-cors requests go out (the page just cannot read the answer); the CORS one dies at its preflight
    assert results == {"no_cors_text": "opaque 0", "no_cors_png": "opaque 0", "cors_png": "failed: TypeError"}
    assert _tree(server.dataset_dir) == before
    assert not pad_in_frame, framed.url  # the browser would not show the pad in the other site's frame


@pytest.mark.browser
def test_a_rebound_host_name_is_refused(browser, server, mnist_test):
    """A page whose name was rebound to 127.0.0.1 after it loaded talks to the pad under its own name."""
    before = _tree(server.dataset_dir)
    port = urllib.parse.urlsplit(server.url).port
    page = browser.new_page()
    assert page.goto(f"http://rebound.test:{port}/").status == 400
    # same-origin for the browser, so no preflight and no Origin check can help: only the Host name does
    status = page.evaluate(
        """async png => (await fetch("/api/collect?label=8", {method: "POST",
        headers: {"Content-Type": "image/png"}, body: new Uint8Array(png)})).status""",
        list(_canvas_png(_first(mnist_test, 8))),
    )
    page.close()
    assert status == 400 and _tree(server.dataset_dir) == before
    for method, path in (("GET", "/"), ("GET", "/api/info"), ("POST", "/api/collect?label=8")):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request(
            method,
            path,
            _canvas_png(_first(mnist_test, 8)) if method == "POST" else None,
            {"Host": f"evil.example:{port}", "Content-Type": "image/png"},
        )
        response = connection.getresponse()
        assert (response.status, response.read()) == (400, b"Invalid host header"), path
        connection.close()
    assert _tree(server.dataset_dir) == before


def test_posts_marked_cross_origin_or_not_an_image_are_refused(server, mnist_test):
    digit = _canvas_png(_first(mnist_test, 8))
    own_origin = server.url.rstrip("/")
    before = _tree(server.dataset_dir)
    cases = [
        ("image/png", {"Origin": "http://127.0.0.1:1"}, 403, "cross-origin requests are refused"),
        ("image/png", {"Origin": "null"}, 403, "cross-origin requests are refused"),  # sandboxed frames, file: pages
        ("image/png", {"Origin": own_origin, "Sec-Fetch-Site": "same-site"}, 403, "cross-origin requests are refused"),
        ("image/png", {"Sec-Fetch-Site": "cross-site"}, 403, "cross-origin requests are refused"),
        ("text/plain", {}, 415, "send the image with Content-Type image/png"),
        ("application/x-www-form-urlencoded", {}, 415, "send the image with Content-Type image/png"),
        ("multipart/form-data; boundary=x", {}, 415, "send the image with Content-Type image/png"),
    ]
    for path in ("api/collect?label=8", "api/predict"):
        for content_type, headers, status, message in cases:
            code, answer = _post(server.url + path, digit, content_type, headers)
            assert (code, message in answer["error"]) == (status, True), (path, headers, code, answer)
    # what the pad's own page sends
    headers = {"Origin": own_origin, "Sec-Fetch-Site": "same-origin"}
    assert _post(server.url + "api/predict", digit, "image/png; charset=binary", headers)[0] == 200
    assert _tree(server.dataset_dir) == before


@pytest.mark.browser
def test_default_collect_dir_allowed_host_and_unwritable_label_folder(served_model, browser, mnist_test, tmp_path):
    """Without --collect-dir drawings go to data/custom under the current folder, never into the
    dataset store $DIGITNET_DATA; the page works under a name given with --allowed-host; /api/info
    shows no absolute path; a label folder that cannot be made is one JSON error and one console line."""
    store = tmp_path / "store"
    store.mkdir()
    env = {**os.environ, "DIGITNET_DATA": str(store)}
    model = str(served_model.run_dir / "model.onnx")  # outside the server's folder
    server, proc = _start_server(tmp_path, model, "--allowed-host", "pad.test", env=env)
    try:
        assert server.dataset_dir == tmp_path / "data" / "custom"
        page = browser.new_page(viewport={"width": 1000, "height": 560})
        page.goto(f"http://pad.test:{urllib.parse.urlsplit(server.url).port}/")
        page.wait_for_selector("body[data-ready=true]")
        assert page.text_content("#model-info") == "model.onnx (mnist) - drawings are saved to data/custom/<label>/"
        _draw(page, _strokes(_first(mnist_test, 5)))
        page.click("#labels button[data-label='5']")
        page.wait_for_function("document.querySelector('#status').textContent.startsWith('saved')")
        page.close()
        assert len(list((tmp_path / "data" / "custom" / "5").glob("*.png"))) == 1 and not any(store.iterdir())

        (tmp_path / "data" / "custom" / "6").write_text("a file where the label folder 6 should be")
        code, answer = _post(server.url + "api/collect?label=6", _canvas_png(_first(mnist_test, 6)))
        assert code == 500 and answer["error"].startswith("cannot save in data/custom/6: "), answer
        with urllib.request.urlopen(server.url + "api/info", timeout=30) as response:
            assert str(tmp_path) not in response.read().decode()
    finally:
        _stop(proc)
    (line,) = server.console().splitlines()
    assert "cannot save a drawing in" in line and "Traceback" not in line


def test_a_collect_dir_this_user_cannot_write_is_one_line(served_model):
    readonly = Path(tempfile.mkdtemp())
    readonly.chmod(0o555)
    # root writes into any folder: run the server as nobody then
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    try:
        command = [
            sys.executable,
            "-m",
            "digitnet.cli",
            "serve",
            str(served_model.run_dir),
            "--collect-dir",
            str(readonly / "custom"),
        ]
        result = subprocess.run([*as_nobody, *command], capture_output=True, text=True, timeout=120)
    finally:
        readonly.rmdir()
    assert result.returncode == 2 and result.stdout == "", result
    assert result.stderr == (
        f"error: cannot save drawings in {readonly}/custom: {readonly} is not a folder "
        "you can write; pass --collect-dir <a folder of yours>\n"
    )


def test_a_client_leaving_mid_upload_is_one_console_line(server, mnist_test):
    before = server.console()
    parts = urllib.parse.urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.sendall(
            b"POST /api/collect?label=3 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            b"Content-Length: 100000\r\n\r\n" + _canvas_png(_first(mnist_test, 3))[:5000]
        )
    for _ in range(300):  # the server notices the closed connection on its own schedule
        if server.console() != before:
            break
        threading.Event().wait(0.1)
    said = server.console()[len(before) :]
    assert said == "WARNING:  a client left during its upload to /api/collect; nothing saved\n"
    assert _post(server.url + "api/predict", _canvas_png(_first(mnist_test, 3)))[0] == 200


def test_twenty_clients_uploading_the_largest_images_all_get_their_answer(server, mnist_test):
    """At most two uploads are decoded at once (memory); the others wait and are answered, with the right codes."""
    largest = _canvas_png(_first(mnist_test, 1), size=2048)
    blank = _png(Image.new("RGBA", (2048, 2048)))
    too_large = _png(Image.new("L", (2049, 2048)))
    bodies = [largest] * 16 + [blank] * 2 + [too_large] * 2
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: _post(server.url + "api/predict", body), bodies))
    assert [code for code, _ in answers] == [200] * 16 + [422] * 2 + [413] * 2
    assert all(answer["top"][0]["label"] == "1" for _, answer in answers[:16])


# ---------------------------------------------------------------------------- models and command line


def test_registry_best_is_served_from_its_stored_onnx(served_model):
    classifier = load_onnx_classifier("best", served_model.registry_url)
    from_file = load_onnx_classifier(str(served_model.run_dir / "model.onnx"))
    x = torch.rand(4, 1, 28, 28)
    assert classifier.source.startswith("registry model") and classifier.data_name == "mnist"
    assert torch.equal(classifier.probabilities(x), from_file.probabilities(x))


def test_command_line_errors_are_one_line(served_model, tmp_path, capsys):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    empty_registry = f"sqlite:///{tmp_path / 'empty.db'}"
    cases = [
        ([str(tmp_path / "missing.onnx")], "model " + str(tmp_path / "missing.onnx") + " not found"),
        ([str(served_model.checkpoint)], "is not an .onnx file"),
        ([str(tmp_path)], "has no model.onnx"),
        (["best", "--db", empty_registry], "no model in registry"),
        ([str(served_model.run_dir), "--port", str(taken.getsockname()[1])], "cannot listen on 127.0.0.1"),
        ([str(served_model.run_dir), "--port", "70000"], "must be between 0 and 65535"),
        ([str(served_model.run_dir), "--host", "0.0.0.0"], "name the host names or addresses its users open it by"),
        (
            [str(served_model.run_dir), "--collect-dir", str(served_model.checkpoint / "custom")],
            "is not a folder you can write",
        ),
    ]
    for args, message in cases:
        assert cli.main(["serve", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    taken.close()
