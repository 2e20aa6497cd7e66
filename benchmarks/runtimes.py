"""PyTorch vs ONNX fp32 vs ONNX int8 on real test images: agreement, accuracy and speed of each runtime.

    python benchmarks/runtimes.py runs/mt/models/magnetic_tile.pt --data ../shared/datasets/magnetic_tile

All runtimes get the same preprocessed batches (decoding excluded from the timings). Prints, per runtime: the
largest map / score difference from PyTorch, decisions that differ, I-AUROC and P-AUROC (exact metrics on the 256x256
maps, as `inpformer test` computes them) and images/s at the batch size given.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from inpformer import INPFormer, load_mvtec
from inpformer.data.images import ImageDataset
from inpformer.deploy import export_model
from inpformer.export import OnnxRuntime
from inpformer.metrics import compute_metrics
from inpformer.runtime import TorchRuntime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a trained .pt model")
    parser.add_argument("--data", required=True, help="an MVTec-layout category folder with a test split")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N test images of each type")
    args = parser.parse_args()

    detector = INPFormer.load(args.checkpoint)
    samples = load_mvtec(args.data, "test")
    if args.limit:
        by_type: dict[str, list] = {}
        for sample in samples:
            by_type.setdefault(sample.defect_type, []).append(sample)
        samples = [s for items in by_type.values() for s in items[: args.limit]]
    dataset = ImageDataset(samples, detector.preprocess, with_masks=True)
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([item["image"] for item in items]).numpy()
    valid = torch.stack([item["valid"] for item in items]).numpy()
    masks = F.interpolate(torch.stack([item["mask"] for item in items])[:, None].float(),
                          size=detector.scorer.map_shape, mode="nearest")
    masks = masks[:, 0].to(torch.uint8).numpy()
    labels = np.array([s.label for s in samples])
    threshold = detector.calibration.for_category(samples[0].category).image
    print(f"{len(samples)} test images ({labels.sum()} defective) of {args.data}; batch {args.batch_size}; "
          f"{torch.get_num_threads()} threads")

    with tempfile.TemporaryDirectory() as folder:
        runtimes = {"torch": TorchRuntime(detector.inference_graph())}
        for name, int8 in (("onnx fp32", False), ("onnx int8", True)):
            path = export_model(args.checkpoint, Path(folder) / f"model{'.int8' if int8 else ''}.onnx", int8=int8)
            runtimes[name] = OnnxRuntime(path)
        reference = None
        for name, runtime in runtimes.items():
            runtime(images[: args.batch_size], valid[: args.batch_size])  # warm-up
            start = time.perf_counter()
            outputs = [runtime(images[i : i + args.batch_size], valid[i : i + args.batch_size])
                       for i in range(0, len(images), args.batch_size)]
            seconds = time.perf_counter() - start
            maps = np.concatenate([o.maps for o in outputs])
            scores = np.concatenate([o.scores for o in outputs])
            metrics = compute_metrics(labels, scores, masks, maps)
            reference = reference or (maps, scores)
            print(f"{name:10s} max |map - torch| {np.abs(maps - reference[0]).max():.2e}  "
                  f"max |score - torch| {np.abs(scores - reference[1]).max():.2e}  "
                  f"decisions differing {int(((scores > threshold) != (reference[1] > threshold)).sum())}  "
                  f"I-AUROC {metrics['I-AUROC']:.4f}  P-AUROC {metrics['P-AUROC']:.4f}  "
                  f"{len(images) / seconds:.2f} images/s")


if __name__ == "__main__":
    main()
