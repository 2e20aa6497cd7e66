"""The HTTP service: every endpoint and every bad input, with FastAPI's TestClient and a tiny trained model."""

import asyncio
import base64
import io
import json
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from synthetic import make_mvtec, tiny_cli

from inpformer import INPFormer, load_mvtec
from inpformer.cli import main
from inpformer.deploy import load_predictor
from inpformer.service import app as serving
from inpformer.service.app import API_KEY_ENV, Batcher, Busy, PixelBudget, Settings, create_app
from inpformer.service.feedback import feedback_folders

_trained: dict[str, str] = {}


def tiny_model(tmp_path_factory) -> str:
    """A tiny random-backbone model trained on generated images, once per session (the browser test shares it)."""
    if "path" not in _trained:
        folder = tmp_path_factory.mktemp("serving")
        data = make_mvtec(folder / "data", categories=("plate",), n_train=8, n_good_test=2, defect_types={"spot": 2})
        detector = INPFormer(preset="cpu", backbone="tiny_random", image_size=64, crop_size=56, iterations=5,
                             batch_size=4, warmup_iterations=2)
        _trained["path"] = str(detector.fit(load_mvtec(data, "train", ["plate"]), progress=False).save(folder / "m.pt"))
    return _trained["path"]


def png_bytes(height: int = 48, width: int = 64, seed: int = 0) -> bytes:
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def decode_png(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    return load_predictor(tiny_model(tmp_path_factory))


@pytest.fixture
def serve(predictor, monkeypatch):
    """Starts the app with the given settings (inference threads run inside the `with`)."""
    monkeypatch.delenv(API_KEY_ENV, raising=False)

    def start(predictor=predictor, **settings) -> TestClient:
        return TestClient(create_app(predictor, Settings(**settings)), raise_server_exceptions=False)

    return start


class Gated:
    """The real predictor, held at a gate before each batch; records batch sizes."""

    def __init__(self, inner, fail: bool = False):
        self.inner, self.fail = inner, fail
        self.gate, self.entered, self.batches = threading.Event(), threading.Event(), []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict(self, images, sources, category):
        self.entered.set()
        assert self.gate.wait(30)
        self.batches.append(len(images))
        if self.fail:
            raise RuntimeError("CUDA exploded at /secret/path.py line 12")
        return self.inner.predict(images, sources, category)


def wait_until(condition, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_raw_image_gets_decision_mask_and_boxes(serve, predictor):
    data = png_bytes(48, 64)
    with serve() as client:
        response = client.post("/predict?name=part.png", content=data, headers={"content-type": "image/png"})
    assert response.status_code == 200
    [result] = response.json()["results"]
    expected = predictor.predict([np.asarray(Image.open(io.BytesIO(data)))], ["part.png"])[0]
    assert result["source"] == "part.png" and result["category"] == "plate"
    assert result["score"] == pytest.approx(expected.score, abs=1e-5)
    assert result["threshold"] == pytest.approx(expected.threshold, abs=1e-5)
    assert result["decision"] == ("defective" if result["score"] > result["threshold"] else "good")
    assert 0 <= result["normalized_score"] <= 1 and (result["width"], result["height"]) == (64, 48)
    mask = decode_png(result["mask_png"])
    assert mask.shape == (48, 64) and int(mask.astype(bool).sum()) == result["defect_pixels"]
    assert len(result["regions"]) == len(expected.regions)
    for region in result["regions"]:
        x0, y0, x1, y1 = region["box"]
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 48 and mask[y0:y1, x0:x1].any()
    assert "overlay_png" not in result


def test_overlay_is_added_on_request(serve):
    with serve() as client:
        result = client.post("/predict?overlay=true", content=png_bytes(40, 56)).json()["results"][0]
    assert decode_png(result["overlay_png"]).shape == (40, 56, 3)


def test_multipart_batch_keeps_order_and_bad_files_fail_alone(serve):
    files = [("files", ("a.png", png_bytes(seed=1), "image/png")),
             ("files", ("notes.txt", b"not an image", "text/plain")),
             ("files", ("cut.png", png_bytes(seed=2)[:200], "image/png")),
             ("files", ("b.png", png_bytes(32, 32, seed=3), "image/png"))]
    with serve() as client:
        response = client.post("/predict", files=files)
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["source"] for r in results] == ["a.png", "notes.txt", "cut.png", "b.png"]
    assert "decision" in results[0] and "decision" in results[3] and results[3]["width"] == 32
    assert results[1]["error"].startswith("notes.txt: cannot read image")
    assert "truncated" in results[2]["error"] and "decision" not in results[2]


def test_all_bad_files_is_400_naming_each(serve):
    files = [("files", ("x.jpg", b"\xff\xd8garbage", "image/jpeg")), ("files", ("y.png", b"", "image/png"))]
    with serve() as client:
        response = client.post("/predict", files=files)
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "no image could be read" and [r["source"] for r in body["results"]] == ["x.jpg", "y.png"]


def _multipart_without_files() -> tuple[bytes, dict]:
    body = b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n--b--\r\n'
    return body, {"content-type": "multipart/form-data; boundary=b"}


@pytest.mark.parametrize(("method", "path", "body", "headers", "status", "message"), [
    ("post", "/predict", b"", {}, 400, "empty request body"),
    ("post", "/predict", b"GIF89a\x01\x00", {}, 400, "upload: cannot read image"),
    ("post", "/predict", *_multipart_without_files(), 400, "no files in the multipart form"),
    ("post", "/predict?category=screw", png_bytes(), {}, 400, "unknown category 'screw'"),
    ("post", "/predict?overlay=perhaps", png_bytes(), {}, 422, "query.overlay"),
    ("get", "/predict", None, {}, 405, "method GET not allowed on /predict"),
    ("get", "/nowhere", None, {}, 404, "no such endpoint: /nowhere"),
])
def test_bad_requests_get_a_clear_json_error(serve, method, path, body, headers, status, message):
    with serve() as client:
        response = client.request(method, path, content=body, headers=headers)
        assert client.get("/health").status_code == 200  # and the server goes on
    assert response.status_code == status
    assert message in response.json()["error"] and "Traceback" not in response.text


def test_oversize_bodies_are_refused_by_length_and_while_reading(serve):
    data = png_bytes(64, 64)
    with serve(max_bytes=len(data) - 1) as client:
        declared = client.post("/predict", content=data)
        streamed = client.post("/predict", content=iter([data[:1000], data[1000:]]))  # chunked: no Content-Length
        assert client.post("/predict", content=png_bytes(8, 8)).status_code == 200
    assert streamed.request.headers.get("content-length") is None
    for response in (declared, streamed):
        assert response.status_code == 413
        assert f"over the limit of {len(data) - 1} bytes" in response.json()["error"]


def test_oversize_pixel_counts_are_refused(serve):
    with serve(max_pixels=32 * 32) as client:
        response = client.post("/predict", files=[("files", ("big.png", png_bytes(40, 40), "image/png")),
                                                  ("files", ("ok.png", png_bytes(32, 32), "image/png"))])
    big, ok = response.json()["results"]
    assert response.status_code == 200 and "decision" in ok
    assert big["error"] == "big.png: cannot read image (too large: 40x40 pixels, limit 1024); downscale the image"


def test_too_many_files_in_one_request(serve):
    with serve(max_files=2) as client:
        response = client.post("/predict", files=[("files", (f"{i}.png", png_bytes(seed=i), "image/png"))
                                                  for i in range(3)])
    assert response.status_code == 400 and "Too many files" in response.json()["error"]


def test_health_model_and_openapi(serve, predictor):
    with serve() as client:
        health = client.get("/health").json()
        model = client.get("/model").json()
        schema = client.get("/openapi.json").json()
    assert health == {"status": "ok", "queued": 0, "queue_size": 64, "inflight_pixels": 0,
                      "max_inflight_pixels": 16_000_000}
    assert model["backbone"] == "tiny_random" and model["categories"] == ["plate"]
    assert (model["image_size"], model["crop_size"]) == (70, 70)  # deployed: the whole image, never a crop
    assert model["thresholds"]["plate"]["image"] == pytest.approx(predictor.calibration.thresholds["plate"].image)
    assert model["created"] == predictor.metadata["created"] and model["versions"]["inpformer"]
    assert model["limits"]["max_batch"] == 8 and "api_key" not in model["limits"]
    assert {"/predict", "/model", "/health"} <= set(schema["paths"])
    assert "multipart/form-data" in schema["paths"]["/predict"]["post"]["requestBody"]["content"]


@pytest.mark.parametrize("from_env", [False, True])
def test_api_key_guards_every_endpoint_but_health(serve, monkeypatch, from_env):
    settings = {} if from_env else {"api_key": "s3cret"}
    if from_env:
        monkeypatch.setenv(API_KEY_ENV, "s3cret")
    with serve(**settings) as client:
        for path in ("/model", "/openapi.json"):
            assert client.get(path).status_code == 401
            assert client.get(path, headers={"X-API-Key": "wrong"}).status_code == 401
            assert client.get(path, headers={"X-API-Key": "s3cret"}).status_code == 200
        refused = client.post("/predict", content=png_bytes())
        assert refused.status_code == 401 and "X-API-Key" in refused.json()["error"]
        assert client.post("/predict", content=png_bytes(), headers={"X-API-Key": "s3cret"}).status_code == 200
        assert client.get("/health").status_code == 200
        assert client.get("/").status_code == 200  # the page asks for the key itself


def test_requests_are_served_while_inference_runs_and_batched(serve, predictor):
    gated = Gated(predictor)
    with serve(gated, max_batch=4) as client:
        responses = []

        def post(seed):
            responses.append(client.post("/predict", content=png_bytes(seed=seed)))

        first = threading.Thread(target=post, args=(0,))
        first.start()
        assert gated.entered.wait(30)  # the first image is inside the runtime, held at the gate
        others = [threading.Thread(target=post, args=(seed,)) for seed in (1, 2, 3)]
        for thread in others:
            thread.start()
        wait_until(lambda: client.get("/health").json()["queued"] == 3)  # answered while inference runs
        gated.gate.set()
        for thread in [first, *others]:
            thread.join(30)
    assert [r.status_code for r in responses] == [200] * 4
    assert gated.batches == [1, 3]  # the three waiting requests ran as one batch


def test_full_queue_answers_503_with_retry_after(serve, predictor):
    gated = Gated(predictor)
    with serve(gated, max_batch=1, queue_size=2) as client:
        batcher = client.app.state.batcher
        held = batcher.submit([np.zeros((8, 8, 3), np.uint8)], ["held"], None)
        assert gated.entered.wait(30)
        queued = batcher.submit([np.zeros((8, 8, 3), np.uint8)] * 2, ["q1", "q2"], None)
        response = client.post("/predict", content=png_bytes())
        gated.gate.set()
        assert [f.result(30).source for f in held + queued] == ["held", "q1", "q2"]
        assert client.post("/predict", content=png_bytes()).status_code == 200
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert "retry later" in response.json()["error"]


def test_inference_failure_is_a_500_without_details(serve, predictor):
    gated = Gated(predictor, fail=True)
    gated.gate.set()
    with serve(gated) as client:
        response = client.post("/predict", content=png_bytes())
        assert client.get("/health").status_code == 200
    assert response.status_code == 500
    assert response.json() == {"error": "internal server error; see the server log"}


def test_batcher_finishes_queued_images_on_close(predictor):
    batcher = Batcher(predictor, max_batch=2, max_wait=0.05, capacity=3)
    futures = batcher.submit([np.full((16, 16, 3), v, np.uint8) for v in (0, 128, 255)], ["a", "b", "c"], None)
    with pytest.raises(Busy):
        batcher.submit([np.zeros((8, 8, 3), np.uint8)] * 4, list("wxyz"), None)
    batcher.close()
    assert [f.result(0).source for f in futures] == ["a", "b", "c"]
    with pytest.raises(Busy, match="shutting down"):
        batcher.submit([np.zeros((8, 8, 3), np.uint8)], ["late"], None)


def test_page_is_served_and_needs_nothing_online(serve):
    with serve() as client:
        page = client.get("/")
        assets = [client.get(f"/static/{name}") for name in ("app.js", "style.css")]
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="static/app.js"' in page.text and all(a.status_code == 200 for a in assets)
    assert not any("://" in text for text in (page.text, *(a.text for a in assets)))


def test_serve_command_reports_a_bad_model_path(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "inpformer: error:" in capsys.readouterr().err


def bomb(width: int = 7000, height: int = 7000) -> bytes:
    """A 1-bit PNG of a few KB that decodes to width x height RGB pixels."""
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """The names of the images the service decodes."""
    names = []

    def spy(data, max_pixels, name, formats):
        names.append(name)
        return read_image(data, max_pixels, name, formats)

    read_image = serving.read_image
    monkeypatch.setattr(serving, "read_image", spy)
    return names


def test_pixel_bombs_are_refused_before_decoding(serve, decodes):
    data = bomb()
    assert len(data) < 10_000
    with serve() as client:
        alone = client.post("/predict", content=data)
        many = client.post("/predict", files=[("files", (f"{i}.png", data, "image/png")) for i in range(32)])
        pair = client.post("/predict", files=[("files", (f"{i}.png", bomb(5000, 3000), "image/png"))
                                              for i in range(2)])
        health = client.get("/health").json()
    assert alone.status_code == 400 and "too large: 7000x7000 pixels, limit 16000000" in alone.json()["error"]
    assert many.status_code == 400 and all("too large" in r["error"] for r in many.json()["results"])
    assert pair.status_code == 413 and pair.json()["error"] == (
        "request too large: its images have 30000000 pixels, over the limit of 16000000 per request; send fewer or "
        "smaller images (server option --max-request-pixels)")
    assert decodes == [] and health["inflight_pixels"] == 0


def test_pixels_in_flight_are_bounded_server_wide_before_decoding(serve, predictor, decodes):
    gated = Gated(predictor)
    with serve(gated, max_inflight_pixels=3000) as client:
        responses = {}

        def post(name, height, width):
            responses[name] = client.post(f"/predict?name={name}", content=png_bytes(height, width))

        threads = [threading.Thread(target=post, args=("first", 40, 40))]
        threads[0].start()
        assert gated.entered.wait(30)
        threads.append(threading.Thread(target=post, args=("small", 20, 20)))  # fits beside the first
        threads[1].start()
        wait_until(lambda: client.get("/health").json()["queued"] == 1)
        assert client.get("/health").json()["inflight_pixels"] == 2000  # decoded: in inference and queued
        post("refused", 40, 40)
        gated.gate.set()
        for thread in threads:
            thread.join(30)
        assert client.get("/health").json()["inflight_pixels"] == 0
        post("again", 40, 40)
    assert [responses[name].status_code for name in ("first", "small", "refused", "again")] == [200, 200, 503, 200]
    assert responses["refused"].headers["retry-after"] == "1"
    assert responses["refused"].json()["error"] == ("busy: 2000 of 3000 image pixels are in flight (server option "
                                                    "--max-inflight-pixels); retry later")
    assert decodes == ["first", "small", "again"]  # never the refused image


def test_pixels_go_back_after_every_kind_of_answer(serve, predictor):
    gated = Gated(predictor, fail=True)
    gated.gate.set()
    with serve(gated, max_request_pixels=1000) as client:
        statuses = [client.post("/predict", content=png_bytes(20, 20)).status_code,  # inference fails
                    client.post("/predict", content=b"junk").status_code,
                    client.post("/predict", content=png_bytes(40, 40)).status_code]
        health = client.get("/health").json()
    assert statuses == [500, 400, 413] and health["inflight_pixels"] == 0


def test_a_cancelled_request_keeps_its_pixels_until_its_threads_are_done():
    async def scenario():
        budget = PixelBudget(100)
        lease = budget.take(60)
        decoding, release = threading.Event(), threading.Event()

        def decode():
            decoding.set()
            assert release.wait(30)

        async def request():
            try:
                await lease.run(decode)
            finally:
                lease.close()

        task = asyncio.create_task(request())
        while not decoding.is_set():
            await asyncio.sleep(0.01)
        task.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await task
        held = budget.used
        release.set()
        while budget.used:
            await asyncio.sleep(0.01)
        with pytest.raises(Busy, match="--max-inflight-pixels"):
            budget.take(101)
        return held

    assert asyncio.run(scenario()) == 60  # the pixels stayed taken while the thread still decoded


def test_a_cancelled_request_does_not_stop_the_inference_thread(predictor):
    gated = Gated(predictor)
    batcher = Batcher(gated, max_batch=1, max_wait=0, capacity=8)
    budget = PixelBudget(100)
    lease = budget.take(10)
    held = batcher.submit([np.zeros((8, 8, 3), np.uint8)], ["held"], None)
    assert gated.entered.wait(30)
    [gone] = batcher.submit([np.zeros((8, 8, 3), np.uint8)], ["gone"], None)
    lease.watch([gone])
    assert gone.cancel()  # as asyncio.wrap_future does when its request is cancelled
    lease.close()
    gated.gate.set()
    later = batcher.submit([np.zeros((8, 8, 3), np.uint8)], ["later"], None)
    assert [f.result(30).source for f in held + later] == ["held", "later"]
    assert gated.batches == [1, 1] and not batcher.dead and budget.used == 0  # the cancelled image never ran
    batcher.close()


def test_a_stopped_inference_thread_makes_health_fail(serve, monkeypatch):
    def broken(self, jobs, category):
        raise RuntimeError("a bug in the batching code")

    monkeypatch.setattr(Batcher, "_run", broken)
    with serve() as client:
        [future] = client.app.state.batcher.submit([np.zeros((8, 8, 3), np.uint8)], ["x"], None)
        with pytest.raises(RuntimeError, match="inference thread stopped"):
            future.result(30)
        health = client.get("/health")
        refused = client.post("/predict", content=png_bytes())
    assert health.status_code == 503 and health.json()["status"] == "dead"
    assert refused.status_code == 503 and "restart" in refused.json()["error"]


@pytest.mark.parametrize(("path", "status", "echo"), [
    ("/predict?category={0}", 400, "unknown category '{0}'"),
    ("/predict?category={path:>50000000}", 400, "unknown category '{path:>50000000}'"),
    ("/predict?category=" + "c" * 5000, 400, "unknown category '" + "c" * 99 + "…'"),
    ("/{0}{path:>50000000}", 404, "no such endpoint: /{0}{path:>50000000} (see /openapi.json)"),
    ("/" + "p" * 5000, 404, "no such endpoint: /" + "p" * 98 + "…"),
    ("/predict?overlay=" + "x" * 5000, 422, "query.overlay: Input should be a valid boolean"),
    ("/predict?name=" + "n" * 5000, 400, "n" * 99 + "…: cannot read image"),
])
def test_client_text_is_echoed_verbatim_and_bounded(serve, path, status, echo):
    with serve() as client:
        method = "get" if status == 404 else "post"
        response = client.request(method, path, content=b"junk")
    assert response.status_code == status and echo in response.json()["error"]
    assert len(response.content) < 1000


def test_file_names_are_echoed_bounded(serve):
    with serve() as client:
        response = client.post("/predict", files=[("files", ("f" * 900 + ".png", b"junk", "image/png"))])
    [result] = response.json()["results"]
    assert result["source"] == "f" * 99 + "…" and len(response.content) < 1000


@pytest.mark.parametrize("content_type", ["Multipart/Form-Data; boundary=XyZ", "MULTIPART/FORM-DATA ;  boundary=XyZ",
                                          "multipart/form-data; charset=utf-8; boundary=\"XyZ\""])
def test_multipart_media_type_is_case_insensitive_and_parsed(serve, content_type):
    data = png_bytes(24, 24)
    body = (b'--XyZ\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + data + b"\r\n--XyZ--\r\n")
    with serve() as client:
        response = client.post("/predict", content=body, headers={"content-type": content_type})
    assert response.status_code == 200 and response.json()["results"][0]["source"] == "a.png"


@pytest.mark.parametrize(("options", "message"), [
    (["--max-upload-mb", "nan"], "--max-upload-mb must be a finite number > 0, got nan"),
    (["--max-upload-mb", "inf"], "--max-upload-mb must be a finite number > 0, got inf"),
    (["--max-upload-mb", "0"], "--max-upload-mb must be a finite number > 0, got 0"),
    (["--max-upload-mb", "-1"], "--max-upload-mb must be a finite number > 0, got -1"),
    (["--max-pixels", "0"], "--max-pixels must be a whole number of at least 1, got 0"),
    (["--max-request-pixels", "-3"], "--max-request-pixels must be a whole number of at least 1, got -3"),
    (["--max-inflight-pixels", "0"], "--max-inflight-pixels must be a whole number of at least 1, got 0"),
    (["--max-batch", "0"], "--max-batch must be a whole number of at least 1, got 0"),
    (["--queue-size", "0"], "--queue-size must be a whole number of at least 1, got 0"),
    (["--workers", "0"], "--workers must be at least 1, got 0"),
    (["--port", "70000"], "--port must be a TCP port, 0 to 65535, got 70000"),
    (["--api-key-file", "/nonexistent/key"], "--api-key-file /nonexistent/key: cannot read it (No such file"),
    (["--api-key", "k", "--api-key-file", "f"], "give --api-key-file or --api-key, not both"),
])
def test_serve_options_are_checked_in_one_line(tmp_path, capsys, options, message):
    assert main(["serve", str(tmp_path / "model.pt"), *options]) == 2  # checked before the model is loaded
    err = capsys.readouterr().err
    assert err.startswith(f"inpformer: error: {message}") and err.count("\n") == 1


def test_api_key_file(tmp_path, capsys, monkeypatch):
    served = []
    monkeypatch.setattr(serving, "serve", lambda *args: served.append(args[-1]))
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    assert main(["serve", "run", "--api-key-file", str(key)]) == 0
    assert served[0].api_key == "s3cret"
    key.write_text("\n")
    assert main(["serve", "run", "--api-key-file", str(key)]) == 2
    assert capsys.readouterr().err == f"inpformer: error: --api-key-file {key} is empty; write the key into it\n"


def mark_form(label: str = "good", result: dict | str | None = None, data: bytes | None = None,
              name: str = "part.png") -> dict:
    if result is None:
        result = {"decision": "defective", "score": 0.9, "threshold": 0.5, "category": "plate"}
    return {"files": {"file": (name, png_bytes(30, 40) if data is None else data, "image/png")},
            "data": {"label": label, "result": result if isinstance(result, str) else json.dumps(result)}}


def test_feedback_is_off_by_default(serve):
    with serve() as client:
        assert client.get("/model").json()["feedback"] is False
        response = client.post("/feedback", **mark_form())
    assert response.status_code == 404
    assert response.json() == {"error": "operator feedback is off on this server (server option --feedback-dir DIR "
                                        "turns it on)"}


def test_feedback_keeps_marked_images_with_a_sidecar(serve, tmp_path):
    folder, data = tmp_path / "feedback", png_bytes(30, 40, seed=7)
    key = {"X-API-Key": "k"}
    with serve(feedback_dir=str(folder), api_key="k") as client:
        assert client.get("/model", headers=key).json()["feedback"] is True
        result = client.post("/predict?name=part.png&overlay=true", content=data, headers=key).json()["results"][0]
        stored = [client.post("/feedback", **mark_form(label, result, data), headers=key)
                  for label in ("good", "good", "defective")]
        refused = client.post("/feedback", **mark_form(result=result, data=data))
    assert [r.json() for r in stored] == [{"stored": "good/part.png"}, {"stored": "good/part-2.png"},
                                          {"stored": "defective/part.png"}]
    assert refused.status_code == 401
    image = np.asarray(Image.open(folder / "good" / "part.png"))
    assert np.array_equal(image, np.asarray(Image.open(io.BytesIO(data))))  # the pixels the model judged
    sidecar = json.loads((folder / "good" / "part.json").read_text())
    assert {k: sidecar[k] for k in ("label", "decision", "score", "threshold", "category", "source", "image")} == {
        "label": "good", "decision": result["decision"], "score": result["score"], "threshold": result["threshold"],
        "category": "plate", "source": "part.png", "image": "part.png"}
    assert sidecar["model"]["backbone"] == "tiny_random" and sidecar["time"]
    assert (sidecar["width"], sidecar["height"]) == (40, 30)
    assert "mask_png" not in sidecar and "overlay_png" not in sidecar
    assert sorted(p.name for p in folder.rglob("*")) == sorted(
        ["good", "defective", "part.png", "part.json", "part-2.png", "part-2.json", "part.png", "part.json"])


@pytest.mark.parametrize(("form", "status", "message"), [
    ({"content": b"raw bytes"}, 400, "send a multipart form: file (the image), label (good or defective)"),
    ({"files": {"file": ("a.png", png_bytes(), "image/png")}}, 400, "the form needs the fields file"),
    (mark_form(label="maybe"), 400, "label must be one of good, defective, got 'maybe'"),
    (mark_form(result="{not json"), 400, "result: not JSON"),
    (mark_form(result=[1, 2]), 400, "result: expected the JSON object /predict returned"),
    (mark_form(result={"decision": "good", "threshold": 0.5}), 400, "result: 'score' missing or not a finite number"),
    (mark_form(result={"decision": "good", "score": "NaN", "threshold": 0.5}), 400, "result: 'score' missing"),
    (mark_form(result={"decision": "fine", "score": 1, "threshold": 0.5}), 400, "'decision' must be one of good"),
    (mark_form(data=b"not an image", name="../../etc/x.png"), 400, "../../etc/x.png: cannot read image"),
    (mark_form(data=png_bytes(40, 40)), 400, "cannot read image (too large: 40x40 pixels, limit 1599)"),
    (mark_form(data=png_bytes(30, 30) + b"\0" * 30000), 413, "request body over the limit of 30000 bytes"),
])
def test_bad_feedback_gets_a_clear_error_and_stores_nothing(serve, tmp_path, form, status, message):
    folder = tmp_path / "feedback"
    with serve(feedback_dir=str(folder), max_pixels=40 * 40 - 1, max_bytes=30000) as client:
        response = client.post("/feedback", **form)
    assert response.status_code == status and message in response.json()["error"]
    assert sorted(p.name for p in folder.rglob("*")) == ["defective", "good"]


def test_feedback_dir_is_checked_up_front(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["serve", str(tmp_path / "model.pt"), "--feedback-dir", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err == (f"inpformer: error: --feedback-dir {tmp_path / 'file' / 'good'}: cannot "
                                       "create this folder (Not a directory); give a writable folder path\n")


def test_a_feedback_folder_recalibrates_a_run_and_joins_its_training(tmp_path):
    data = make_mvtec(tmp_path / "data", categories=("plate",), n_train=10, n_good_test=2, defect_types={"spot": 2})
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), *tiny_cli(5, warmup=2)]) == 0
    marked = feedback_folders(tmp_path / "feedback") / "good"
    for i in range(4):
        (marked / f"{i}.png").write_bytes(png_bytes(56, 56, seed=i))
        (marked / f"{i}.json").write_text("{}")  # sidecars are not images: ignored
    assert main(["calibrate", str(run), "--data-good", str(marked), "--quiet"]) == 0
    assert INPFormer.load(run / "models" / "plate.pt").calibration.source == f"4 good images of {marked}"

    retrained = tmp_path / "retrained"
    assert main(["train", "--data", str(data), "--extra-good", str(marked), "--out", str(retrained),
                 *tiny_cli(5, warmup=2)]) == 0
    info = json.loads((retrained / "run.json").read_text())["models"]["plate"]
    assert info["extra_good"] == {"folder": str(marked.resolve()), "images": 4}
    # fitted on 9 + 4 images; the held-out image is the one of the run without them
    assert "training on 13 good images of plate (1 held out for calibration)" in (retrained / "train.log").read_text()
