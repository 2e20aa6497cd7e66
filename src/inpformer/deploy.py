"""From a trained run to deployable predictions: pick a model, run it on a runtime (PyTorch, ONNX, ONNX int8),
export it, and predict files and folders into predictions.csv / .json, overlays, masks and report.html."""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .calibration import check_min_defect_area, describe_area
from .data.images import MAX_PIXELS
from .detector import INPFormer
from .errors import InpformerError
from .export import OnnxRuntime, export_onnx, quantize_int8
from .files import output_file, output_folder, write_text_atomically
from .inference import Failure, Prediction, Predictor, describe_rule, find_images
from .report import GalleryItem, image_uri, write_report
from .runs import log_to_file, read_run, select_models

log = logging.getLogger("inpformer")


RUNTIMES = ("torch", "onnx", "onnx-int8")


def resolve_model(target: str | Path, model: str | None = None, category: str | None = None) -> Path:
    """The model file meant by `target`: a checkpoint (.pt) or ONNX file itself, or a run directory's model
    (chosen by name, by category, or the only one)."""
    target = Path(target)
    if target.is_file():
        return target
    if not target.exists():
        raise InpformerError(f"{target}: not found; pass a run directory, a .pt checkpoint or an .onnx file")
    run = read_run(target)
    models = run["models"]
    if model is not None:
        return target / select_models(run, model, False)[model]["file"]
    if category is not None:
        matching = [info for info in models.values() if category in info["categories"]]
        if not matching:
            known = sorted({c for info in models.values() for c in info["categories"]})
            raise InpformerError(f"--category {category}: no model of {target} knows it; known: {', '.join(known)}")
        return target / matching[0]["file"]
    if len(models) > 1:
        raise InpformerError(f"{target} has {len(models)} models ({', '.join(models)}); choose one with --model NAME "
                             "or --category NAME")
    return target / next(iter(models.values()))["file"]


def load_predictor(target: str | Path, runtime: str = "torch", model: str | None = None,
                   category: str | None = None, threads: int | None = None) -> Predictor:
    """A `Predictor` for a run directory, checkpoint or ONNX file. The ONNX runtimes export the checkpoint next to
    it on first use (model.onnx, model.int8.onnx) and reuse that file while it is newer than the checkpoint."""
    if runtime not in RUNTIMES:
        raise InpformerError(f"unknown --runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")
    path = resolve_model(target, model, category)
    if path.suffix == ".onnx":
        return _onnx_predictor(path, threads)
    if runtime == "torch":
        if threads:
            torch.set_num_threads(threads)
        return INPFormer.load(path).predictor()
    onnx_path = path.with_suffix(".int8.onnx" if runtime == "onnx-int8" else ".onnx")
    if not onnx_path.is_file() or onnx_path.stat().st_mtime < path.stat().st_mtime:
        export_model(path, onnx_path, int8=runtime == "onnx-int8")
    return _onnx_predictor(onnx_path, threads)


def _onnx_predictor(path: Path, threads: int | None) -> Predictor:
    onnx = OnnxRuntime(path, threads)
    try:
        return Predictor(onnx, onnx.metadata)
    except KeyError as error:
        problem = f"no {error} entry"
    except (TypeError, ValueError, AttributeError, InpformerError) as error:
        problem = str(error).splitlines()[0][:200]
    raise InpformerError(f"{path}: malformed inpformer metadata ({problem}); re-export with "
                         "`inpformer export RUN_DIR --onnx FILE`")


def export_model(checkpoint: str | Path, onnx_path: str | Path, int8: bool = False) -> Path:
    """Exports a checkpoint to one self-contained ONNX file (fp32, or int8 weights with `int8`)."""
    onnx_path = output_file(onnx_path, "--onnx", ".onnx")
    detector = INPFormer.load(checkpoint)
    if detector.calibration is None:
        raise InpformerError(f"{checkpoint}: no calibrated thresholds (an imported model, or one trained by an older "
                             "version); run `inpformer calibrate RUN_DIR` (or MODEL.pt --data ROOT) first")
    metadata, size = detector.metadata(), detector.config.deployment_geometry().crop_size
    if not int8:
        return export_onnx(detector.inference_graph(), onnx_path, size, metadata)
    fp32 = export_onnx(detector.inference_graph(), onnx_path.with_suffix(".fp32.tmp.onnx"), size, metadata)
    try:
        return quantize_int8(fp32, onnx_path)
    finally:
        fp32.unlink(missing_ok=True)


def predict_run(target: str | Path, inputs: Sequence[str | Path], out: str | Path, runtime: str = "torch",
                batch_size: int = 8, category: str | None = None, model: str | None = None,
                max_pixels: int = MAX_PIXELS, progress: bool = True,
                min_defect_area: float | None = None) -> tuple[list[dict], list[Failure]]:
    """Predicts every image in `inputs` (files and folders) and writes into `out`: predictions.csv / .json,
    overlays/<name>.png, masks/<name>_mask.png (original resolution) and report.html. A file that cannot be read
    is reported and skipped; returns (the predictions' JSON rows, the failures). `min_defect_area` replaces the
    model's minimum defect area for these predictions."""
    if batch_size < 1:
        raise InpformerError(f"--batch-size must be at least 1, got {batch_size}")
    if max_pixels < 1:
        raise InpformerError(f"--max-pixels must be at least 1, got {max_pixels}")
    if min_defect_area is not None:
        check_min_defect_area(min_defect_area)
    out = output_folder(out, "--out")
    for folder in ("overlays", "masks"):
        output_folder(out / folder, "--out")
    with log_to_file(out / "predict.log"):
        predictor = load_predictor(target, runtime, model, category)
        predictor.max_pixels = max_pixels
        predictor.min_defect_area = min_defect_area
        paths = find_images(inputs)
        if not paths:
            raise InpformerError(f"no images found in {', '.join(map(str, inputs))}; give image files or folders")
        names = _output_names(paths)
        rows, failures, written = [], [], []
        start = time.perf_counter()
        results = predictor.predict_paths(paths, batch_size, category)
        # the files are drawn and encoded in a second thread (PIL and numpy release the GIL), while the model runs
        with ThreadPoolExecutor(max_workers=1) as writer:
            for result in tqdm(results, total=len(paths), desc="predicting", unit="image", disable=not progress):
                if isinstance(result, Failure):
                    log.error("%s", result.message)
                    failures.append(result)
                    continue
                name = names[result.source]
                rows.append(result.to_json() | {"overlay": f"overlays/{name}.png", "mask": f"masks/{name}_mask.png"})
                written.append(writer.submit(_write_outputs, result, out, name))
            gallery = [future.result() for future in written]
        seconds = time.perf_counter() - start
        defective = sum(r["decision"] == "defective" for r in rows)
        log.info("predicted %d images (%d defective, %d failed) in %.1f s (%.1f images/s, runtime %s)", len(rows),
                 defective, len(failures), seconds, len(rows) / seconds, runtime)
        _write_predictions(out, rows, failures)
        thresholds = predictor.calibration.thresholds
        areas = {c: t.min_defect_area if min_defect_area is None else min_defect_area for c, t in thresholds.items()}
        uniform = len(set(areas.values())) == 1
        summary = {"model": str(target), "runtime": runtime, "images": str(len(rows)),
                   "defective": str(defective), "failed": str(len(failures)),
                   "decision": describe_rule(areas[""] if uniform else None),
                   **{f"image threshold ({c or 'all categories'})": f"{t.image:.6f} ({t.method})"
                      for c, t in thresholds.items()},
                   **({} if uniform else {f"minimum defect area ({c or 'all categories'})": describe_area(a)
                                          for c, a in areas.items()}),
                   "thresholds set on": predictor.calibration.source or "unrecorded images"}
        write_report(out / "report.html", "inpformer predictions", gallery, summary)
    return rows, failures


def _write_outputs(result: Prediction, out: Path, name: str) -> GalleryItem:
    """The overlay and mask PNGs of one prediction (fast zlib level: these files are written per image), and its
    report item."""
    overlay = result.overlay()
    Image.fromarray(overlay).save(out / "overlays" / f"{name}.png", compress_level=1)
    Image.fromarray(result.mask.astype(np.uint8) * 255).save(out / "masks" / f"{name}_mask.png", compress_level=1)
    return GalleryItem(result.source, result.category, result.score, result.normalized_score, result.decision,
                       image_uri(overlay), link=f"overlays/{name}.png")


def _output_names(paths: Sequence[Path]) -> dict[str, str]:
    """A unique file-name stem per input (stem, then stem-2, stem-3... for equal names in different folders)."""
    names, used = {}, set()
    for path in paths:
        name, count = path.stem, 1
        while name in used:
            count += 1
            name = f"{path.stem}-{count}"
        used.add(name)
        names[str(path)] = name
    return names


def _write_predictions(out: Path, rows: list[dict], failures: list[Failure]) -> None:
    content = {"predictions": rows, "failures": [{"source": f.source, "error": f.message} for f in failures]}
    write_text_atomically(out / "predictions.json", json.dumps(content, indent=2))
    columns = ["source", "category", "score", "normalized_score", "threshold", "decision", "defect_pixels",
               "regions", "overlay", "mask", "error"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns)
    writer.writeheader()
    writer.writerows(row | {"regions": len(row["regions"])} for row in rows)
    writer.writerows({"source": failure.source, "error": failure.message} for failure in failures)
    write_text_atomically(out / "predictions.csv", buffer.getvalue())
