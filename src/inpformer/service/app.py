"""HTTP service: `inpformer serve RUN_DIR` answers POST /predict with decisions, masks and defect boxes, serves
an operator page at /, and with --feedback-dir keeps the images operators mark as wrongly judged (POST /feedback).

Inference threads own the predictor. A request reads its images' sizes from their headers and takes their pixels
from the server's pixel budget before decoding anything (413 if the request could never fit, 503 with Retry-After
while the budget is in use), decodes them in the thread pool and puts them on a bounded queue; an inference thread
takes up to `max_batch` queued images (waiting `max_wait` seconds for more), runs the predictor once and resolves
each image's future. The event loop only moves bytes, so requests are accepted while inference runs, and a full
queue is answered 503 too. The pixels go back to the budget when the request and all work done for it end.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import io
import json
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from PIL import Image
from python_multipart.multipart import parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from .. import __version__
from ..data.images import IMAGE_FORMATS, image_pixels, read_image
from ..deploy import load_predictor
from ..errors import InpformerError
from ..inference import Prediction, Predictor
from ..visualize import prediction_overlay
from .feedback import feedback_folders, parse_mark, store_mark

log = logging.getLogger("inpformer")
STATIC = Path(__file__).parent / "static"
API_KEY_ENV = "INPFORMER_API_KEY"
_T = TypeVar("_T")
_WORKER_ENV = "INPFORMER_SERVE"  # how `serve` hands its arguments to uvicorn's worker processes
_ECHO = 100  # characters of a client's text (names, paths, categories) echoed back in an error

# Memory: measured on one 16 MP image, the peak cost of an admitted pixel is 11 bytes while decoding (Pillow's
# buffers, then 3 for the RGB uint8 array) and 36 in the predictor (float32 maps at the original resolution, float64
# temporaries of their normalisation, the mask and region labels, besides the image); the PNGs add nothing above that
# (the overlay is blended in row blocks). A real server grew by 740 MiB for a request of 20 M pixels with overlay, and
# peaked 900 MiB over its start for the next one (the allocator keeps freed memory for reuse). Counting 48 bytes for
# every pixel in flight whatever it is doing, the default budget of 16 M pixels bounds the growth near 770 MB, under
# 1 GiB with a 32 MiB request body. Tiled models cost more per pixel: see `pixel_weight`.
PIXEL_BUDGET = 16_000_000

# the server option behind each limit, for error messages (the two without one are set from Python only)
_OPTIONS = {"max_bytes": "--max-upload-mb (in bytes)", "max_pixels": "--max-pixels",
            "max_request_pixels": "--max-request-pixels", "max_inflight_pixels": "--max-inflight-pixels",
            "max_files": "Settings.max_files", "max_batch": "--max-batch", "queue_size": "--queue-size",
            "threads": "Settings.threads"}


@dataclass
class Settings:
    """Limits of one server process."""

    max_bytes: int = 32 * 2**20  # request body
    max_pixels: int = PIXEL_BUDGET  # per image
    max_request_pixels: int = PIXEL_BUDGET  # all images of one request; beyond: 413
    max_inflight_pixels: int = PIXEL_BUDGET  # of all requests being decoded, predicted or encoded; beyond: 503
    max_files: int = 32  # images per request
    max_batch: int = 8  # images per runtime call
    max_wait: float = 0.005  # seconds a batch waits for more images
    queue_size: int = 64  # images waiting for inference; beyond: 503
    threads: int = 1  # inference threads
    api_key: str | None = None  # needed by every endpoint but /health and the page; or $INPFORMER_API_KEY
    feedback_dir: str | None = None  # where POST /feedback keeps marked images; None: off

    def __post_init__(self):
        for name, option in _OPTIONS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InpformerError(f"{option} must be a whole number of at least 1, got {value!r}")
        if not 0 <= self.max_wait < math.inf:
            raise InpformerError(f"Settings.max_wait must be a finite number of seconds >= 0, got {self.max_wait!r}")
        self.max_files = min(self.max_files, self.queue_size)  # a larger request could never be queued
        self.max_request_pixels = min(self.max_request_pixels, self.max_inflight_pixels)  # nor admitted
        self.api_key = self.api_key or os.environ.get(API_KEY_ENV) or None
        if self.feedback_dir is not None:
            self.feedback_dir = str(feedback_folders(self.feedback_dir))


def upload_limit(megabytes: float) -> int:
    """`--max-upload-mb` in bytes; InpformerError unless it is a finite number > 0."""
    if not 0 < megabytes < math.inf:
        raise InpformerError(f"--max-upload-mb must be a finite number > 0, got {megabytes:g}")
    return math.ceil(megabytes * 2**20)


def read_api_key(path: str | Path) -> str:
    """The API key in the file `path` (`--api-key-file`), without its trailing newline."""
    try:
        key = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise InpformerError(f"--api-key-file {path}: not UTF-8 text; write the key as plain text") from None
    except OSError as error:
        raise InpformerError(f"--api-key-file {path}: cannot read it ({error.strerror or error})") from None
    if not key.strip():
        raise InpformerError(f"--api-key-file {path} is empty; write the key into it")
    return key


def pixel_weight(predictor: Predictor) -> float:
    """What one image pixel costs in the pixel budget: 1, and for a tiled model also the pixels of the stitched map
    made for it (blended in float64, ~43 bytes a map pixel measured, counted as 1.2 image pixels)."""
    if predictor.tiling is None:
        return 1.0
    height, width = predictor.tiling.map_shape((1000, 1000), predictor.metadata["map_size"])
    return 1 + 1.2 * height * width / 1e6


class Busy(Exception):
    """The server cannot take the images now (inference queue or pixel budget full, or no inference thread)."""


class PixelBudget:
    """Decoded pixels in flight, server-wide: a request takes its images' pixels before decoding them."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._lock = threading.Lock()

    def take(self, pixels: int) -> Lease:
        """A lease on `pixels`, or `Busy` if they are not free now."""
        with self._lock:
            if self.used + pixels > self.limit:
                raise Busy(f"busy: {self.used} of {self.limit} image pixels are in flight (server option "
                           "--max-inflight-pixels); retry later")
            self.used += pixels
        return Lease(self, pixels)

    def _give_back(self, pixels: int) -> None:
        with self._lock:
            self.used -= pixels


class Lease:
    """Pixels taken from a `PixelBudget`, given back once the request has closed the lease and no thread works for
    it any more: a cancelled request (client gone, time-out, shutdown) keeps them until its threads are done."""

    def __init__(self, budget: PixelBudget, pixels: int):
        self._budget, self._pixels = budget, pixels
        self._holders = 1  # the request
        self._lock = threading.Lock()

    def _hold(self) -> bool:
        with self._lock:
            if not self._holders:  # closed: the pixels are back in the budget
                return False
            self._holders += 1
            return True

    def _drop(self, *_) -> None:
        with self._lock:
            self._holders -= 1
            done = not self._holders
        if done:
            self._budget._give_back(self._pixels)

    def close(self) -> None:
        """The request is over (answered, failed or cancelled)."""
        self._drop()

    async def run(self, function: Callable[..., _T], *args) -> _T | None:
        """`function(*args)` in the thread pool, holding the lease while it runs (not at all once it is closed)."""

        def work():
            if not self._hold():
                return None
            try:
                return function(*args)
            finally:
                self._drop()

        return await run_in_threadpool(work)

    def watch(self, futures: list[Future]) -> None:
        """Holds the lease until each future (an image in the inference queue) is done."""
        for future in futures:
            self._hold()
            future.add_done_callback(self._drop)


class _Job(NamedTuple):
    image: np.ndarray
    name: str
    category: str | None
    future: Future


class Batcher:
    """Micro-batching inference: `threads` threads run queued images through `predictor` in batches."""

    def __init__(self, predictor: Predictor, max_batch: int, max_wait: float, capacity: int, threads: int = 1):
        self.predictor, self.max_batch, self.max_wait, self.capacity = predictor, max_batch, max_wait, capacity
        self._jobs: deque[_Job] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._stopped = False  # an inference thread died of an unexpected error
        self._threads = [threading.Thread(target=self._loop, name=f"inpformer-inference-{i}", daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    @property
    def pending(self) -> int:
        return len(self._jobs)

    @property
    def dead(self) -> bool:
        """An inference thread stopped while the server runs: it needs a restart."""
        return self._stopped or (not self._closed and not all(thread.is_alive() for thread in self._threads))

    def submit(self, images: list[np.ndarray], names: list[str], category: str | None) -> list[Future]:
        """Queues the images of one request together, or raises `Busy` if they do not all fit."""
        if not images:
            return []
        with self._ready:
            if self._closed:
                raise Busy("the server is shutting down")
            if self.dead:
                raise Busy("an inference thread stopped; the server needs a restart (see its log)")
            if len(self._jobs) + len(images) > self.capacity:
                raise Busy(f"busy: {len(self._jobs)} images are waiting for inference (limit {self.capacity}); "
                           "retry later")
            futures = [Future() for _ in images]
            self._jobs.extend(_Job(image, name, category, future)
                              for image, name, future in zip(images, names, futures, strict=True))
            self._ready.notify_all()
        return futures

    def close(self) -> None:
        """Finishes the queued images, then stops the threads."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        for thread in self._threads:
            thread.join()

    def _loop(self) -> None:
        batch: list[_Job] = []
        try:
            while batch := self._next_batch():
                groups: dict[str | None, list[_Job]] = {}
                for job in batch:
                    groups.setdefault(job.category, []).append(job)
                for category, jobs in groups.items():
                    self._run(jobs, category)
        except BaseException as error:  # a bug, not a bad image: fail what waits, and /health tells a supervisor
            log.critical("inference thread stopped; restart the server", exc_info=error)
            with self._ready:
                self._stopped = True
                waiting = [job for job in self._jobs if job.future.set_running_or_notify_cancel()]
                self._jobs.clear()
            for job in [*batch, *waiting]:
                if not job.future.done():
                    job.future.set_exception(RuntimeError("the inference thread stopped"))

    def _next_batch(self) -> list[_Job]:
        """The next jobs, their futures set running; [] once closed and drained."""
        while True:
            with self._ready:
                while not self._jobs and not self._closed:
                    self._ready.wait()
                deadline = time.monotonic() + self.max_wait
                while (not self._closed and len(self._jobs) < self.max_batch
                       and (left := deadline - time.monotonic()) > 0):
                    self._ready.wait(left)
                batch = [self._jobs.popleft() for _ in range(min(self.max_batch, len(self._jobs)))]
            # a request that went away (client gone, time-out, shutdown) cancelled its futures: skip its images
            running = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if running or not batch:
                return running

    def _run(self, jobs: list[_Job], category: str | None) -> None:
        try:
            predictions = self.predictor.predict([j.image for j in jobs], [j.name for j in jobs], category)
        except Exception as error:  # the requests get a 500; the service goes on
            log.exception("inference failed")
            for job in jobs:
                job.future.set_exception(error)
        else:
            for job, prediction in zip(jobs, predictions, strict=True):
                job.future.set_result(prediction)


class RequestTooLarge(Exception):
    """A request body went over `Settings.max_bytes`."""


class BodyLimit:
    """ASGI middleware refusing request bodies over `max_bytes`: by Content-Length before reading, and by counting
    the bytes as they arrive (a client may send no Content-Length, or a false one)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await _too_large(self.max_bytes)(scope, receive, send)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise RequestTooLarge()
            return message

        await self.app(scope, counting_receive, send)


def _too_large(max_bytes: int) -> JSONResponse:
    return JSONResponse({"error": f"request body over the limit of {max_bytes} bytes; send fewer or smaller images "
                                  "(server option --max-upload-mb)"}, 413)


PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
}}}
PREDICT_RESPONSES = {400: {"description": "no image could be read (each result names its error)"},
                     401: {"description": "missing or wrong API key"},
                     413: {"description": "request too large (bytes or pixels)"},
                     503: {"description": "inference queue or pixel budget full; retry after Retry-After seconds"}}


def create_app(predictor: Predictor, settings: Settings | None = None) -> FastAPI:
    """The service for one predictor (its inference threads run while the app's lifespan does)."""
    settings = settings or Settings()

    weight = pixel_weight(predictor)
    marked_by = {key: predictor.metadata.get(key) for key in ("backbone", "categories", "created")}  # for feedback

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.pixels = PixelBudget(settings.max_inflight_pixels)
        app.state.batcher = Batcher(predictor, settings.max_batch, settings.max_wait, settings.queue_size,
                                    settings.threads)
        yield
        await run_in_threadpool(app.state.batcher.close)

    app = FastAPI(title="inpformer", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None, description="INP-Former anomaly detection: POST images to /predict.")
    app.add_middleware(BodyLimit, max_bytes=settings.max_bytes)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(RequestTooLarge, lambda request, error: _too_large(settings.max_bytes))
    app.add_exception_handler(Exception, _internal_error)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    auth = [Depends(_api_key_check(settings.api_key))] if settings.api_key else []

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health", summary="Liveness, queue length and pixels in flight (never needs the API key); 503 when "
                                "an inference thread has stopped and the server needs a restart")
    async def health(request: Request) -> JSONResponse:
        batcher, pixels = request.app.state.batcher, request.app.state.pixels
        state = {"queued": batcher.pending, "queue_size": settings.queue_size, "inflight_pixels": pixels.used,
                 "max_inflight_pixels": pixels.limit}
        if batcher.dead:
            return JSONResponse({"status": "dead", "error": "an inference thread stopped; restart the server (see "
                                                            "its log)", **state}, 503)
        return JSONResponse({"status": "ok", **state})

    @app.get("/model", dependencies=auth, summary="The model: backbone, sizes, categories, thresholds, provenance")
    async def model() -> dict:
        meta = predictor.metadata
        return {"backbone": meta["backbone"], "image_size": meta["image_size"], "crop_size": meta["crop_size"],
                "map_size": meta["map_size"], "categories": meta["categories"],
                "thresholds": meta["calibration"]["thresholds"],
                "threshold_source": predictor.calibration.source, "created": meta.get("created"),
                "versions": meta.get("versions", {}), "runtime": type(predictor.runtime).__name__,
                "server_version": __version__, "feedback": settings.feedback_dir is not None,
                "limits": {k: v for k, v in dataclasses.asdict(settings).items()
                           if k not in ("api_key", "feedback_dir")}
                | {"pixel_weight": weight}}

    @app.get("/openapi.json", dependencies=auth, include_in_schema=False)
    async def openapi() -> dict:
        return app.openapi()

    @app.post("/predict", dependencies=auth, openapi_extra=PREDICT_BODY, responses=PREDICT_RESPONSES,
              summary="Predict one image (raw body) or several (multipart): per image, a result or an error")
    async def predict(request: Request, overlay: bool = False, category: str | None = None,
                      name: str = "upload") -> JSONResponse:
        """Each result: source, category, score, normalized_score (0.5 = threshold), threshold, decision,
        defect_pixels, regions (box [x0, y0, x1, y1], area, peak), width, height, mask_png (base64) and, with
        `overlay=true`, overlay_png; or {source, error}. `category` names a multi-class model's category
        (default: recognised per image); `name` names a raw-body image."""
        category = _known_category(predictor, category)
        uploads = await _read_uploads(request, settings.max_files, _clip(name))
        sizes = await run_in_threadpool(_sizes, uploads, settings.max_pixels)
        pixels = sum(size for size in sizes if isinstance(size, int))
        cost = math.ceil(pixels * weight)
        weighted = f" (x{weight:.1f} for this tiled model: {cost})" if weight != 1 else ""
        lease = _admit(request, cost, settings.max_request_pixels, f"its images have {pixels} pixels{weighted}")
        if isinstance(lease, JSONResponse):
            return lease
        try:
            decoded = await lease.run(_decode, uploads, sizes)
            readable = [i for i, item in enumerate(decoded) if isinstance(item, np.ndarray)]
            try:
                futures = request.app.state.batcher.submit([decoded[i] for i in readable],
                                                           [uploads[i][0] for i in readable], category)
            except Busy as error:
                return _busy(error)
            lease.watch(futures)
            predictions = await asyncio.gather(*map(asyncio.wrap_future, futures))
            return await lease.run(_response, [source for source, _ in uploads], decoded,
                                   dict(zip(readable, predictions, strict=True)), overlay)
        finally:
            lease.close()

    @app.post("/feedback", dependencies=auth, openapi_extra=FEEDBACK_BODY, responses=FEEDBACK_RESPONSES,
              summary="Keep an image an operator marked as good (a false reject) or defective (a missed defect)")
    async def feedback(request: Request) -> JSONResponse:
        """Stores the image as good/<name>.png or defective/<name>.png under --feedback-dir, with a JSON sidecar
        of the mark and the result it corrects; answers {"stored": "good/<name>.png"}."""
        if settings.feedback_dir is None:
            return JSONResponse({"error": "operator feedback is off on this server (server option --feedback-dir "
                                          "DIR turns it on)"}, 404)
        name, data, label, result = await _read_mark(request)
        try:
            mark = parse_mark(label, result)
            pixels = await run_in_threadpool(image_pixels, data, settings.max_pixels, name, IMAGE_FORMATS)
        except InpformerError as error:
            return JSONResponse({"error": str(error)}, 400)
        lease = _admit(request, pixels, settings.max_request_pixels, f"the image has {pixels} pixels")
        if isinstance(lease, JSONResponse):
            return lease
        try:
            stored = await lease.run(_keep_mark, Path(settings.feedback_dir), data, pixels, name, label, mark,
                                     marked_by)
        except InpformerError as error:
            return JSONResponse({"error": str(error)}, 400)
        finally:
            lease.close()
        return JSONResponse({"stored": stored})

    return app


FEEDBACK_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file", "label", "result"], "properties": {
        "file": {"type": "string", "format": "binary"},
        "label": {"type": "string", "enum": ["good", "defective"]},
        "result": {"type": "string", "description": "the JSON object /predict returned for this image"}}}}}}}
FEEDBACK_RESPONSES = {400: {"description": "no image, an unreadable one, or a bad label or result"},
                      401: {"description": "missing or wrong API key"},
                      404: {"description": "feedback is off (no --feedback-dir)"},
                      413: {"description": "request too large (bytes or pixels)"},
                      503: {"description": "pixel budget full; retry after Retry-After seconds"}}


async def _read_mark(request: Request) -> tuple[str, bytes, str, str]:
    """(file name, image bytes, label, result JSON text) of a multipart POST /feedback."""
    media_type, _ = parse_options_header(request.headers.get("content-type"))
    if media_type != b"multipart/form-data":
        raise HTTPException(400, "send a multipart form: file (the image), label (good or defective) and result "
                                 "(the JSON /predict returned for it)")
    async with request.form(max_files=1, max_fields=2) as form:
        file, label, result = form.get("file"), form.get("label"), form.get("result")
        if not isinstance(file, UploadFile) or not isinstance(label, str) or not isinstance(result, str):
            raise HTTPException(400, "the form needs the fields file (the image), label (good or defective) and "
                                     "result (the JSON /predict returned for it)")
        return _clip(file.filename or "upload"), await file.read(), label, result


def _keep_mark(folder: Path, data: bytes, pixels: int, name: str, label: str, mark: dict, model: dict) -> str:
    return store_mark(folder, read_image(data, pixels, name, IMAGE_FORMATS), name, label, mark, model)


def _admit(request: Request, cost: int, limit: int, counted: str) -> Lease | JSONResponse:
    """A lease on `cost` pixels of the server's budget, or the answer refusing the request: 413 when it is over the
    per-request `limit` (`counted` says what it holds), 503 while the budget is full."""
    if cost > limit:
        return JSONResponse({"error": f"request too large: {counted}, over the limit of {limit} per request; send "
                                      "fewer or smaller images (server option --max-request-pixels)"}, 413)
    try:
        return request.app.state.pixels.take(cost)
    except Busy as error:
        return _busy(error)


def _busy(error: Busy) -> JSONResponse:
    return JSONResponse({"error": str(error)}, 503, headers={"Retry-After": "1"})


def _clip(text: str, limit: int = _ECHO) -> str:
    """A client's text, at most `limit` characters, to echo back."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _known_category(predictor: Predictor, category: str | None) -> str | None:
    """The `category` query parameter, checked against the model's categories ("" or none: recognised per image)."""
    known = [name for name in predictor.calibration.thresholds if name]
    if category and category not in known:
        raise HTTPException(400, f"unknown category {_clip(category)!r}; this model knows: {', '.join(known)}")
    return category or None


def _api_key_check(expected: str):
    header = APIKeyHeader(name="X-API-Key", auto_error=False, description="required when the server has a key")

    async def check(key: str | None = Depends(header)) -> None:
        if not hmac.compare_digest((key or "").encode(), expected.encode()):
            raise HTTPException(401, "missing or wrong API key; send it in the X-API-Key header")

    return check


async def _read_uploads(request: Request, max_files: int, name: str) -> list[tuple[str, bytes]]:
    """(name, bytes) of each file of a multipart form, or of the raw body."""
    media_type, _ = parse_options_header(request.headers.get("content-type"))  # as Starlette's form parser reads it
    if media_type == b"multipart/form-data":
        async with request.form(max_files=max_files, max_fields=max_files) as form:
            files = [(_clip(value.filename or key), await value.read()) for key, value in form.multi_items()
                     if isinstance(value, UploadFile)]
        if not files:
            raise HTTPException(400, "no files in the multipart form; send images as file fields "
                                     "(e.g. curl -F files=@part.png)")
        return files
    body = await request.body()
    if not body:
        raise HTTPException(400, "empty request body; send an image (raw bytes) or a multipart form of images")
    return [(name, body)]


def _sizes(uploads: list[tuple[str, bytes]], max_pixels: int) -> list[int | str]:
    """Each upload's pixel count from its header alone, or the one-line reason it cannot be read."""
    sizes: list[int | str] = []
    for name, data in uploads:
        try:
            sizes.append(image_pixels(data, max_pixels, name, IMAGE_FORMATS))
        except InpformerError as error:
            sizes.append(str(error))
    return sizes


def _decode(uploads: list[tuple[str, bytes]], sizes: list[int | str]) -> list[np.ndarray | str]:
    """Each upload as an RGB array, decoding no more pixels than its header announced, or why it cannot be read."""
    decoded: list[np.ndarray | str] = []
    for (name, data), size in zip(uploads, sizes, strict=True):
        try:
            decoded.append(size if isinstance(size, str) else read_image(data, size, name, IMAGE_FORMATS))
        except InpformerError as error:
            decoded.append(str(error))
    return decoded


def _response(sources: list[str], decoded: list[np.ndarray | str], predictions: dict[int, Prediction],
              overlay: bool) -> JSONResponse:
    """The results in upload order (rendered here, in a worker thread: the PNGs can be large); 400 if none."""
    results = [_result(item, predictions[i], overlay) if i in predictions else {"source": sources[i], "error": item}
               for i, item in enumerate(decoded)]
    if predictions:
        return JSONResponse({"results": results})
    return JSONResponse({"error": results[0]["error"] if len(results) == 1 else "no image could be read",
                         "results": results}, 400)


def _result(image: np.ndarray, prediction: Prediction, overlay: bool) -> dict:
    result = prediction.to_json() | {"width": image.shape[1], "height": image.shape[0],
                                     "mask_png": _png(prediction.mask)}
    if overlay:
        result["overlay_png"] = _png(prediction_overlay(image, prediction.anomaly_map, prediction.mask))
    return result


def _png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    if error.status_code == 404:
        message = f"no such endpoint: {_clip(request.url.path)} (see /openapi.json)"
    elif error.status_code == 405:
        message = f"method {_clip(request.method)} not allowed on {_clip(request.url.path)}"
    else:  # our own messages, or Starlette's (multipart parsing), which may quote the request
        message = _clip(str(error.detail), 4 * _ECHO)
    return JSONResponse({"error": message}, error.status_code, headers=error.headers)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = "; ".join(_clip(f"{'.'.join(map(str, e['loc']))}: {e['msg']}", 2 * _ECHO) for e in error.errors()[:5])
    return JSONResponse({"error": f"invalid request: {problems}"}, 422)


async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    log.error("%s %r failed", _clip(request.method), _clip(request.url.path), exc_info=error)
    return JSONResponse({"error": "internal server error; see the server log"}, 500)


def serve(target: str | Path, host: str = "127.0.0.1", port: int = 8000, runtime: str = "torch", workers: int = 1,
          model: str | None = None, settings: Settings | None = None) -> None:
    """Runs the service until interrupted. `workers` > 1 starts that many processes, each with its own model."""
    import uvicorn

    if workers < 1:
        raise InpformerError(f"--workers must be at least 1, got {workers}")
    if not 0 <= port <= 65535:
        raise InpformerError(f"--port must be a TCP port, 0 to 65535, got {port}")
    settings = settings or Settings()
    threads = max(1, (os.cpu_count() or 1) // workers)
    predictor = load_predictor(target, runtime, model, threads=threads)  # fails early; exports ONNX once
    if settings.api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    if workers == 1:
        uvicorn.run(create_app(predictor, settings), host=host, port=port)
        return
    del predictor
    os.environ[_WORKER_ENV] = json.dumps({"target": str(target), "runtime": runtime, "model": model,
                                          "threads": threads, "settings": dataclasses.asdict(settings)})
    # Loading a model can keep a worker from answering uvicorn's health pings for more than the default 5 s.
    uvicorn.run("inpformer.service.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                timeout_worker_healthcheck=120)


def app_from_env() -> FastAPI:
    """The app of one uvicorn worker process, from the arguments `serve` left in the environment."""
    options = json.loads(os.environ[_WORKER_ENV])
    predictor = load_predictor(options["target"], options["runtime"], options["model"], threads=options["threads"])
    return create_app(predictor, Settings(**options["settings"]))
