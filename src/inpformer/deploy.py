"""From a trained run to deployable predictions: pick a model, run it on a runtime (PyTorch, ONNX, ONNX int8,
OpenVINO), export it, and predict files and folders into predictions.csv / .json, overlays, masks and report.html."""

from __future__ import annotations

import csv
import io
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .calibration import check_min_defect_area, describe_area
from .data.datasets import load_folder
from .data.images import MAX_PIXELS, Sample
from .detector import INPFormer
from .errors import InpformerError, first_line
from .export import OPENVINO_XML, OnnxRuntime, export_onnx, export_openvino, is_openvino_folder, open_runtime
from .files import output_file, output_folder, write_text_atomically
from .inference import Failure, Prediction, Predictor, describe_rule, find_images
from .quantize import RecordingRuntime, quantize_int8, set_decision_threshold
from .report import GalleryItem, image_uri, write_report
from .runs import held_out_images, log_to_file, read_run, select_models

log = logging.getLogger("inpformer")


RUNTIMES = ("torch", "onnx", "onnx-int8", "openvino")


def resolve_model(target: str | Path, model: str | None = None, category: str | None = None) -> Path:
    """The model meant by `target`: a checkpoint (.pt), ONNX file or OpenVINO folder itself, or a run directory's
    model (chosen by name, by category, or the only one)."""
    target = Path(target)
    if target.is_file() or is_openvino_folder(target):
        return target
    if not target.exists():
        raise InpformerError(f"{target}: not found; pass a run directory, a .pt checkpoint, an .onnx file or an "
                             "OpenVINO folder")
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
    """A `Predictor` for a run directory, checkpoint, ONNX file or OpenVINO folder. The other runtimes export the
    checkpoint next to it on first use (model.onnx, model.int8.onnx, model.openvino/) and reuse that export while it
    is newer than the checkpoint; a run directory's int8 export is calibrated on the run's held-out good images."""
    if runtime not in RUNTIMES:
        raise InpformerError(f"unknown --runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")
    path = resolve_model(target, model, category)
    if path.suffix == ".onnx" or is_openvino_folder(path):
        return _exported_predictor(path, threads)
    if runtime == "torch":
        if threads:
            torch.set_num_threads(threads)
        return INPFormer.load(path).predictor()
    exported = path.with_suffix({"onnx": ".onnx", "onnx-int8": ".int8.onnx", "openvino": ".openvino"}[runtime])
    written = exported / OPENVINO_XML if runtime == "openvino" else exported
    if not written.is_file() or written.stat().st_mtime < path.stat().st_mtime:
        run_dir = Path(target) if Path(target).is_dir() else None
        if runtime == "onnx-int8" and run_dir is None:
            raise InpformerError(f"{path}: --runtime onnx-int8 calibrates on the held-out good images of a run; give "
                                 f"the run directory, or export it first: `inpformer export {path} --onnx "
                                 f"{exported} --int8 --calibration-data DIR`")
        if runtime == "openvino":
            export_model(path, openvino=exported)
        else:
            export_model(path, exported, int8="static" if runtime == "onnx-int8" else None, run_dir=run_dir)
    return _exported_predictor(exported, threads)


def _exported_predictor(path: Path, threads: int | None) -> Predictor:
    runtime = open_runtime(path, threads)
    try:
        return Predictor(runtime, runtime.metadata)
    except KeyError as error:
        problem = f"no {error} entry"
    except (TypeError, ValueError, AttributeError, InpformerError) as error:
        problem = first_line(error)
    option = "--openvino DIR" if path.is_dir() else "--onnx FILE"
    raise InpformerError(f"{path}: malformed inpformer metadata ({problem}); re-export with "
                         f"`inpformer export RUN_DIR {option}`")


def export_model(checkpoint: str | Path, onnx_path: str | Path | None = None, int8: str | None = None,
                 openvino: str | Path | None = None, calibration_data: str | Path | None = None,
                 run_dir: str | Path | None = None) -> list[Path]:
    """Exports a checkpoint to one self-contained ONNX file (fp32, or int8 with `int8` "static" or "dynamic") and/or
    an OpenVINO folder (fp32, or the static int8 model); returns the paths written. Static int8 is calibrated on
    good images: those of the folder `calibration_data`, or else the held-out images of `run_dir` (the run of
    `checkpoint`), which set its thresholds at training. Their activations set the int8 ranges, and the int8
    model's own scores of them its thresholds (recalibrated as the checkpoint's were, so its decisions are not
    shifted by int8 rounding); an OpenVINO int8 folder gets the same thresholds."""
    if onnx_path is None and openvino is None:
        raise InpformerError("nothing to export: give --onnx FILE and/or --openvino DIR")
    if int8 == "dynamic" and openvino is not None:
        raise InpformerError("--openvino exports fp32 or --int8 static (OpenVINO runs its int8 ranges), not --int8 "
                             "dynamic; give --int8 static, or --int8 dynamic with --onnx FILE alone")
    if calibration_data is not None and int8 != "static":
        raise InpformerError("--calibration-data calibrates --int8 static; add it, or drop --calibration-data")
    onnx_path = None if onnx_path is None else output_file(onnx_path, "--onnx", ".onnx")
    detector = INPFormer.load(checkpoint)
    if detector.calibration is None:
        raise InpformerError(f"{checkpoint}: no calibrated thresholds (an imported model, or one trained by an older "
                             "version); run `inpformer calibrate RUN_DIR` (or MODEL.pt --data ROOT) first")
    calibration = (_int8_calibration_images(detector, Path(checkpoint), calibration_data, run_dir)
                   if int8 == "static" else None)
    written = []
    with tempfile.TemporaryDirectory(prefix="inpformer-export-") as tmp:
        fp32 = Path(tmp) / "model.onnx" if int8 or onnx_path is None else onnx_path
        export_onnx(detector.inference_graph(), fp32, detector.config.deployment_geometry().crop_size,
                    detector.metadata())
        final = fp32
        if int8 == "static":
            final = _static_int8(detector, fp32, onnx_path or Path(tmp) / "model.int8.final.onnx", *calibration)
        elif int8 is not None:
            final = quantize_int8(fp32, onnx_path, int8)
        if onnx_path is not None:
            written.append(final)
        if openvino is not None:
            written.append(export_openvino(final, openvino))
    return written


def _int8_calibration_images(detector: INPFormer, checkpoint: Path, folder: str | Path | None,
                             run_dir: str | Path | None) -> tuple[list[Sample], str]:
    """The good images that calibrate a static int8 export, and which they are in words."""
    if folder is not None:
        if len(detector.categories) != 1:
            raise InpformerError(f"--calibration-data {folder}: a plain folder holds images of one category and this "
                                 f"model has {len(detector.categories)}; export its run directory instead (the "
                                 "run's held-out images calibrate it)")
        try:
            good = load_folder(folder, category=detector.categories[0])[0]
        except InpformerError as error:
            raise InpformerError(f"--calibration-data {error}") from None
        return good, f"{len(good)} good images of {folder}"
    if run_dir is None:
        raise InpformerError(f"{checkpoint}: --int8 static needs good images to calibrate on; give "
                             "--calibration-data DIR, or export the run directory (its held-out good images)")
    return held_out_images(run_dir, checkpoint, detector.config)


def _static_int8(detector: INPFormer, fp32: Path, path: Path, samples: list[Sample], source: str) -> Path:
    """Quantises `fp32` calibrated on `samples`, then recalibrates the thresholds on the int8 model's scores."""
    recorder = RecordingRuntime(OnnxRuntime(fp32))
    log.info("int8: recording the activations of %d good images (%s)", len(samples), source)
    detector.score(samples, keep_maps=False, deployment=True, runtime=recorder)
    int8 = quantize_int8(fp32, fp32.with_suffix(".int8.onnx"), "static", recorder.batches)
    previous = detector.calibration
    if previous.thresholds[""].method == "false-reject":
        if previous.source != source:
            log.warning("int8: the thresholds were set on %s; the int8 ones are set on %s (give --calibration-data "
                        "to choose other images)", previous.source or "unrecorded images", source)
        detector.calibrate(samples, "false-reject", _false_reject_rate(detector), source=source,
                           how="int8 export: recalibrated on the int8 model's own scores", runtime=OnnxRuntime(int8))
    else:
        log.warning("int8: thresholds set %s are kept as they are; check them on the int8 model's scores",
                    "by hand" if previous.thresholds[""].method == "manual" else "by F1 on defective images")
    metadata = {**detector.metadata(), "precision": "int8", "quantization": "static"}
    return set_decision_threshold(int8, path, detector.calibration.thresholds[""].image, metadata)


def _false_reject_rate(detector: INPFormer) -> float:
    """The false-reject rate the current thresholds were calibrated for (the last such record of their history)."""
    rates = [h["max_false_reject"] for h in detector.calibration.history if "max_false_reject" in h]
    return float(rates[-1]) if rates else detector.config.max_false_reject


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
