"""PyTorch vs ONNX fp32 vs ONNX int8 (static, dynamic) vs OpenVINO (fp32, static int8) on real test images:
agreement, accuracy and speed of each runtime.

    python benchmarks/runtimes.py runs/mt/models/magnetic_tile.pt --data ../shared/datasets/magnetic_tile

All runtimes get the same preprocessed batches (decoding excluded from the timings). Prints, per runtime: images/s
at the batch size given (and the ratio to ONNX fp32), the largest map / score difference from PyTorch, decisions
that differ from PyTorch's (each runtime with its own thresholds: static int8 recalibrates them on its own scores),
I-AUROC and P-AUROC (exact metrics on the 256x256 maps, as `inpformer test` computes them). Static int8 calibrates
on the run's held-out good images (a checkpoint in RUN_DIR/models/) or on --calibration-data DIR. OpenVINO is
skipped when it is not installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from inpformer import INPFormer, load_mvtec
from inpformer.calibration import Calibration
from inpformer.data.images import ImageDataset
from inpformer.deploy import export_model
from inpformer.export import open_runtime
from inpformer.metrics import MetricAccumulator
from inpformer.runtime import TorchRuntime
from inpformer.scoring import valid_pixels

RUNTIMES = ("torch", "onnx-fp32", "onnx-int8-static", "onnx-int8-dynamic", "openvino-fp32", "openvino-int8-static")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a trained .pt model")
    parser.add_argument("--data", required=True, help="an MVTec-layout category folder with a test split")
    parser.add_argument("--calibration-data", metavar="DIR", help="good images for static int8 (default: the run's "
                                                                  "held-out images)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="threads of every runtime (default: all cores)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N test images of each type")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES),
                        help="comma list; the first is the reference for the differences (default: all)")
    args = parser.parse_args()
    chosen = args.runtimes.split(",")
    if unknown := set(chosen) - set(RUNTIMES):
        parser.error(f"--runtimes: unknown {', '.join(sorted(unknown))}; choose from {', '.join(RUNTIMES)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    checkpoint = Path(args.checkpoint)
    detector = INPFormer.load(checkpoint)
    samples = load_mvtec(args.data, "test")
    if args.limit:
        by_type: dict[str, list] = {}
        for sample in samples:
            by_type.setdefault(sample.defect_type, []).append(sample)
        samples = [s for items in by_type.values() for s in items[: args.limit]]
    dataset = ImageDataset(samples, detector.deployment_preprocess, with_masks=True)
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([item["image"] for item in items]).numpy()
    valid = torch.stack([item["valid"] for item in items]).numpy()
    masks = F.interpolate(torch.stack([item["mask"] for item in items])[:, None].float(),
                          size=detector.deployment_scorer.map_shape, mode="nearest")
    masks = masks[:, 0].to(torch.uint8).numpy()
    labels = np.array([s.label for s in samples])
    print(f"{len(samples)} test images ({labels.sum()} defective) of {args.data}; batch {args.batch_size}; "
          f"{args.threads or 'all'} threads")

    run_dir = checkpoint.parent.parent if (checkpoint.parent.parent / "run.json").is_file() else None
    if any(name.startswith("openvino") for name in chosen) and importlib.util.find_spec("openvino") is None:
        print("openvino: not installed (pip install 'inpformer[openvino]'), skipped")
        chosen = [name for name in chosen if not name.startswith("openvino")]
    with tempfile.TemporaryDirectory() as folder:
        runtimes, metadata = {}, {"torch": detector.metadata()}
        for name in chosen:
            start = time.perf_counter()
            if name == "torch":
                runtimes[name] = TorchRuntime(detector.inference_graph())
                continue
            int8 = name.rsplit("-", 1)[-1] if "-int8-" in name else None  # "static" or "dynamic"
            target = {"openvino": Path(folder) / name} if name.startswith("openvino") else {
                "onnx_path": Path(folder) / f"{name}.onnx"}
            [path] = export_model(checkpoint, int8=int8, run_dir=run_dir,
                                  calibration_data=args.calibration_data if int8 == "static" else None, **target)
            print(f"exported {name} in {time.perf_counter() - start:.0f} s")
            runtimes[name] = open_runtime(path, args.threads)
        reference, speeds = None, {}
        for name, runtime in runtimes.items():
            info = metadata.get(name) or runtime.metadata
            threshold = Calibration.from_dict(info["calibration"]).for_category(samples[0].category).image
            runtime(images[: args.batch_size], valid[: args.batch_size])  # warm-up
            start = time.perf_counter()
            outputs = [runtime(images[i : i + args.batch_size], valid[i : i + args.batch_size])
                       for i in range(0, len(images), args.batch_size)]
            speeds[name] = len(images) / (time.perf_counter() - start)
            maps = np.concatenate([o.maps for o in outputs])
            scores = np.concatenate([o.scores for o in outputs])
            accumulator = MetricAccumulator()  # padding (of a padded input) left out, as `inpformer test` does
            accumulator.add(labels, scores, masks, maps, valid_pixels(torch.from_numpy(valid), maps.shape[1:]).numpy())
            metrics = accumulator.compute()
            reference = reference or (maps, scores, scores > threshold)
            ratio = f" ({speeds[name] / speeds['onnx-fp32']:.2f}x fp32)" if "onnx-fp32" in speeds else ""
            print(f"{name:18s} {speeds[name]:6.2f} images/s{ratio:13s}  max |map - {chosen[0]}| "
                  f"{np.abs(maps - reference[0]).max():.2e}  max |score - {chosen[0]}| "
                  f"{np.abs(scores - reference[1]).max():.2e}  decisions differing "
                  f"{int(((scores > threshold) != reference[2]).sum())}  threshold {threshold:.5f}  "
                  f"I-AUROC {metrics['I-AUROC']:.4f}  P-AUROC {metrics['P-AUROC']:.4f}", flush=True)


if __name__ == "__main__":
    main()
