"""HTTP service: `inpformer serve RUN_DIR` answers POST /predict with decisions, masks and defect boxes, and serves
an operator page at /.

Inference threads own the predictor. A request decodes its images in the thread pool and puts them on a bounded
queue; an inference thread takes up to `max_batch` queued images (waiting `max_wait` seconds for more), runs the
predictor once and resolves each image's future. The event loop only moves bytes, so requests are accepted while
inference runs, and a full queue is answered 503 with Retry-After instead of growing without bound.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import io
import json
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from . import __version__
from .data.images import read_image
from .deploy import load_predictor
from .errors import InpformerError
from .inference import Prediction, Predictor
from .visualize import prediction_overlay

log = logging.getLogger("inpformer")
STATIC = Path(__file__).parent / "static"
API_KEY_ENV = "INPFORMER_API_KEY"
_WORKER_ENV = "INPFORMER_SERVE"  # how `serve` hands its arguments to uvicorn's worker processes


@dataclass
class Settings:
    """Limits of one server process."""

    max_bytes: int = 32 * 2**20  # request body
    max_pixels: int = 50_000_000  # per decoded image
    max_files: int = 32  # images per request
    max_batch: int = 8  # images per runtime call
    max_wait: float = 0.005  # seconds a batch waits for more images
    queue_size: int = 64  # images waiting for inference; beyond: 503
    threads: int = 1  # inference threads
    api_key: str | None = None  # needed by every endpoint but /health and the page; or $INPFORMER_API_KEY

    def __post_init__(self):
        for name in ("max_bytes", "max_pixels", "max_files", "max_batch", "queue_size", "threads"):
            if getattr(self, name) < 1:
                raise InpformerError(f"{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        self.max_files = min(self.max_files, self.queue_size)  # a larger request could never be queued
        self.api_key = self.api_key or os.environ.get(API_KEY_ENV) or None


class Busy(Exception):
    """The inference queue cannot take the images now."""


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
        self._threads = [threading.Thread(target=self._loop, name=f"inpformer-inference-{i}", daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    @property
    def pending(self) -> int:
        return len(self._jobs)

    def submit(self, images: list[np.ndarray], names: list[str], category: str | None) -> list[Future]:
        """Queues the images of one request together, or raises `Busy` if they do not all fit."""
        with self._ready:
            if self._closed:
                raise Busy("the server is shutting down")
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
        while batch := self._next_batch():
            groups: dict[str | None, list[_Job]] = {}
            for job in batch:
                groups.setdefault(job.category, []).append(job)
            for category, jobs in groups.items():
                self._run(jobs, category)

    def _next_batch(self) -> list[_Job]:
        with self._ready:
            while not self._jobs and not self._closed:
                self._ready.wait()
            deadline = time.monotonic() + self.max_wait
            while not self._closed and len(self._jobs) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                self._ready.wait(left)
            return [self._jobs.popleft() for _ in range(min(self.max_batch, len(self._jobs)))]

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
                     401: {"description": "missing or wrong API key"}, 413: {"description": "request too large"},
                     503: {"description": "inference queue full; retry after Retry-After seconds"}}


def create_app(predictor: Predictor, settings: Settings | None = None) -> FastAPI:
    """The service for one predictor (its inference threads run while the app's lifespan does)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
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

    @app.get("/health", summary="Liveness and queue length (never needs the API key)")
    async def health(request: Request) -> dict:
        return {"status": "ok", "queued": request.app.state.batcher.pending, "queue_size": settings.queue_size}

    @app.get("/model", dependencies=auth, summary="The model: backbone, sizes, categories, thresholds, provenance")
    async def model() -> dict:
        meta = predictor.metadata
        return {"backbone": meta["backbone"], "image_size": meta["image_size"], "crop_size": meta["crop_size"],
                "map_size": meta["map_size"], "categories": meta["categories"],
                "thresholds": meta["calibration"]["thresholds"], "created": meta.get("created"),
                "versions": meta.get("versions", {}), "runtime": type(predictor.runtime).__name__,
                "server_version": __version__,
                "limits": {k: v for k, v in dataclasses.asdict(settings).items() if k != "api_key"}}

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
        if category is not None:
            try:
                predictor.calibration.for_category(category)
            except InpformerError as error:
                raise HTTPException(400, str(error)) from None
        uploads = await _read_uploads(request, settings.max_files, name)
        decoded = await run_in_threadpool(_decode, uploads, settings.max_pixels)
        results = [{"source": source, "error": item} if isinstance(item, str) else {}
                   for (source, _), item in zip(uploads, decoded, strict=True)]
        readable = [i for i, item in enumerate(decoded) if isinstance(item, np.ndarray)]
        try:
            futures = request.app.state.batcher.submit([decoded[i] for i in readable],
                                                       [uploads[i][0] for i in readable], category)
        except Busy as error:
            return JSONResponse({"error": str(error)}, 503, headers={"Retry-After": "1"})
        predictions = await asyncio.gather(*map(asyncio.wrap_future, futures))
        for i, prediction in zip(readable, predictions, strict=True):
            results[i] = await run_in_threadpool(_result, decoded[i], prediction, overlay)
        if readable:
            return JSONResponse({"results": results})
        return JSONResponse({"error": results[0]["error"] if len(results) == 1 else "no image could be read",
                             "results": results}, 400)

    return app


def _api_key_check(expected: str):
    header = APIKeyHeader(name="X-API-Key", auto_error=False, description="required when the server has a key")

    async def check(key: str | None = Depends(header)) -> None:
        if not hmac.compare_digest((key or "").encode(), expected.encode()):
            raise HTTPException(401, "missing or wrong API key; send it in the X-API-Key header")

    return check


async def _read_uploads(request: Request, max_files: int, name: str) -> list[tuple[str, bytes]]:
    """(name, bytes) of each file of a multipart form, or of the raw body."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        async with request.form(max_files=max_files, max_fields=max_files) as form:
            files = [(value.filename or key, await value.read()) for key, value in form.multi_items()
                     if isinstance(value, UploadFile)]
        if not files:
            raise HTTPException(400, "no files in the multipart form; send images as file fields "
                                     "(e.g. curl -F files=@part.png)")
        return files
    body = await request.body()
    if not body:
        raise HTTPException(400, "empty request body; send an image (raw bytes) or a multipart form of images")
    return [(name, body)]


def _decode(uploads: list[tuple[str, bytes]], max_pixels: int) -> list[np.ndarray | str]:
    """Each upload as an RGB array, or the one-line reason it cannot be read."""
    decoded: list[np.ndarray | str] = []
    for name, data in uploads:
        try:
            decoded.append(read_image(data, max_pixels=max_pixels, name=name))
        except InpformerError as error:
            decoded.append(str(error))
    return decoded


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


_HTTP_MESSAGES = {404: "no such endpoint: {path} (see /openapi.json)", 405: "method {method} not allowed on {path}"}


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    message = _HTTP_MESSAGES.get(error.status_code, str(error.detail))
    return JSONResponse({"error": message.format(path=request.url.path, method=request.method)}, error.status_code,
                        headers=error.headers)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
    return JSONResponse({"error": f"invalid request: {problems}"}, 422)


async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    log.error("%s %s failed", request.method, request.url.path, exc_info=error)
    return JSONResponse({"error": "internal server error; see the server log"}, 500)


def serve(target: str | Path, host: str = "127.0.0.1", port: int = 8000, runtime: str = "torch", workers: int = 1,
          model: str | None = None, settings: Settings | None = None) -> None:
    """Runs the service until interrupted. `workers` > 1 starts that many processes, each with its own model."""
    import uvicorn

    if workers < 1:
        raise InpformerError(f"--workers must be at least 1, not {workers}")
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
    uvicorn.run("inpformer.serving:app_from_env", factory=True, host=host, port=port, workers=workers,
                timeout_worker_healthcheck=120)


def app_from_env() -> FastAPI:
    """The app of one uvicorn worker process, from the arguments `serve` left in the environment."""
    options = json.loads(os.environ[_WORKER_ENV])
    predictor = load_predictor(options["target"], options["runtime"], options["model"], threads=options["threads"])
    return create_app(predictor, Settings(**options["settings"]))
