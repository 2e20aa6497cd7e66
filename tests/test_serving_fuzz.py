"""Bounded fuzzing of the image reader and of POST /predict: a fixed corpus of mutated PNG, JPEG, TIFF and BMP
files, made from a seeded RNG (bit flips, overwrites, truncations, header edits with huge or zero sizes)."""

import io
import struct
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_serving import tiny_model

from inpformer.data.images import read_image
from inpformer.deploy import load_predictor
from inpformer.errors import InpformerError
from inpformer.service.app import Settings, create_app

SEED = 20240611
HUGE = [(0, 16), (16, 0), (65535, 65535), (7000, 7000), (1, 2**31 - 1), (2**16 - 1, 1)]


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def base_files(rng: np.random.Generator) -> list[tuple[str, bytes]]:
    """Small valid files of each format in several pixel modes (and TIFF compressions)."""
    rgb = Image.fromarray(rng.integers(0, 256, (13, 21, 3), dtype=np.uint8))
    grey16 = Image.fromarray(rng.integers(0, 65536, (13, 21), dtype=np.uint16))
    floats = Image.fromarray(rng.normal(0, 3, (13, 21)).astype(np.float32))
    files = [("png", _encode(rgb.convert(mode), "PNG")) for mode in ("RGB", "RGBA", "L", "LA", "P", "1")]
    files += [("png", _encode(grey16, "PNG")), ("jpeg", _encode(rgb, "JPEG", quality=80)),
              ("jpeg", _encode(rgb.convert("L"), "JPEG")), ("jpeg", _encode(rgb.convert("CMYK"), "JPEG")),
              ("jpeg", _encode(rgb, "JPEG", progressive=True)), ("bmp", _encode(rgb, "BMP")),
              ("bmp", _encode(rgb.convert("P"), "BMP")), ("bmp", _encode(rgb.convert("1"), "BMP")),
              ("tiff", _encode(floats, "TIFF")), ("tiff", _encode(grey16, "TIFF"))]
    files += [("tiff", _encode(rgb, "TIFF", compression=c)) for c in ("raw", "tiff_lzw", "tiff_adobe_deflate",
                                                                      "packbits", "jpeg")]
    files += [("png", _encode(rgb.resize(size), "PNG")) for size in ((1, 1), (1, 300), (300, 1))]  # odd shapes
    return files


def resized(kind: str, data: bytes, width: int, height: int) -> bytes:
    """The file with width and height in its header replaced (image data untouched; PNG's CRC kept valid)."""
    out = bytearray(data)
    if kind == "png":
        out[16:24] = struct.pack(">II", width, height)
        out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])))
    elif kind == "bmp":
        out[18:26] = struct.pack("<ii", min(width, 2**31 - 1), min(height, 2**31 - 1))
    elif kind == "jpeg":
        sof = next(i for i in range(2, len(out) - 9) if out[i] == 0xFF and out[i + 1] in (0xC0, 0xC1, 0xC2))
        out[sof + 5 : sof + 9] = struct.pack(">HH", min(height, 65535), min(width, 65535))
    else:  # tiff: tags 256 (width) and 257 (height) of the first IFD, as LONG
        order = "<" if out[:2] == b"II" else ">"
        (ifd,) = struct.unpack(order + "I", out[4:8])
        (count,) = struct.unpack(order + "H", out[ifd : ifd + 2])
        for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
            tag = struct.unpack(order + "H", out[entry : entry + 2])[0]
            if tag in (256, 257):
                out[entry + 2 : entry + 12] = struct.pack(order + "HII", 4, 1, width if tag == 256 else height)
    return bytes(out)


def corpus(seed: int = SEED) -> list[tuple[str, bytes]]:
    """(label, bytes): each base file, mutated in several seeded ways."""
    rng = np.random.default_rng(seed)
    items = [("empty", b""), ("magic only", b"\x89PNG\r\n\x1a\n"), ("jpeg soi", b"\xff\xd8\xff"),
             ("tiff magic", b"II*\x00"), ("bmp magic", b"BM"), ("text", b"not an image at all")]
    for index, (kind, data) in enumerate(base_files(rng)):
        label = f"{kind}#{index}"
        items.append((label, data))
        for width, height in HUGE:
            items.append((f"{label} header {width}x{height}", resized(kind, data, width, height)))
        for flips in (1, 4, 16):
            mutated = bytearray(data)
            for bit in rng.integers(0, len(data) * 8, flips):
                mutated[bit // 8] ^= 1 << (bit % 8)
            items.append((f"{label} {flips} bit flips", bytes(mutated)))
        for _ in range(2):
            mutated = bytearray(data)
            start = int(rng.integers(0, len(data)))
            mutated[start : start + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
            items.append((f"{label} overwrite at {start}", bytes(mutated)))
        for cut in (8, 30, len(data) // 2, len(data) - 1, int(rng.integers(1, len(data)))):
            items.append((f"{label} cut at {cut}", data[:cut]))
        items.append((f"{label} + garbage", data + rng.integers(0, 256, 64, dtype=np.uint8).tobytes()))
    return items


CORPUS = corpus()
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # Pillow warns about many broken files


def test_corpus_is_fixed_and_varied():
    assert len(CORPUS) > 300 and corpus() == CORPUS  # the same inputs on every run


@pytest.mark.parametrize("limit", [10_000, 2_000_000])
def test_read_image_returns_rgb_or_raises_a_clear_error(limit):
    for label, data in CORPUS:
        try:
            image = read_image(data, max_pixels=limit, name="fuzz")
        except InpformerError as error:
            assert str(error).startswith("fuzz: cannot read image") and "\n" not in str(error), label
        else:
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, label
            assert image.shape[0] * image.shape[1] <= limit and image.size > 0, label


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    app = create_app(load_predictor(tiny_model(tmp_path_factory)), Settings(max_pixels=2_000_000, api_key="fuzz"))
    with TestClient(app, raise_server_exceptions=False, headers={"X-API-Key": "fuzz"}) as client:
        yield client


def _check(response, label: str) -> None:
    assert response.status_code == 200 or 400 <= response.status_code < 500, (label, response.text[:200])
    assert response.status_code == 200 or "error" in response.json(), label


def test_predict_answers_every_mutated_file_without_a_500(client):
    for label, data in CORPUS:
        _check(client.post("/predict", content=data, headers={"content-type": "image/png"}), label)
    for start in range(0, len(CORPUS), 12):  # and in multipart batches, the good files among the bad
        batch = CORPUS[start : start + 12]
        files = [("files", (f"{i}.bin", data, "application/octet-stream")) for i, (_, data) in enumerate(batch)]
        response = client.post("/predict", files=files)
        _check(response, f"batch at {start}")
        if response.status_code == 200:
            assert len(response.json()["results"]) == len(batch)
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["inflight_pixels"] == 0 and health.json()["queued"] == 0
