"""`inpformer predict` end to end against the model alone, on the same images and machine.

    python benchmarks/predict_speed.py runs/mt/models/magnetic_tile.pt ../shared/datasets/magnetic_tile/test/good \\
        --limit 96

- model alone: the runtime on preprocessed batches (images already decoded and resized), batch `--batch-size`;
- predict: `predict_run` as the CLI runs it: reading the files, inference, drawing and writing the overlay and
  mask PNGs per image, predictions.csv/json and report.html.
Prints images/s of both and their ratio (the goal: predict at >= 80 % of the model alone). Run it alone.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from inpformer import load_predictor
from inpformer.data.images import read_image
from inpformer.deploy import predict_run
from inpformer.inference import find_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="run directory, checkpoint or ONNX file")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--runtime", default="torch")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=96, help="at most this many images")
    args = parser.parse_args()

    paths = find_images(args.images)[: args.limit]
    predictor = load_predictor(args.model, args.runtime)
    images = [read_image(p) for p in paths]
    batch = np.stack([predictor.preprocess(image).numpy() for image in images])
    valid = np.stack([predictor.preprocess.valid_box(image.shape).numpy() for image in images])
    predictor.runtime(batch[: args.batch_size], valid[: args.batch_size])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(batch), args.batch_size):
        predictor.runtime(batch[i : i + args.batch_size], valid[i : i + args.batch_size])
    model_speed = len(batch) / (time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        rows, _ = predict_run(args.model, paths, out, args.runtime, args.batch_size, progress=False)
        predict_speed = len(rows) / (time.perf_counter() - start)
    print(f"{len(paths)} images, runtime {args.runtime}, batch {args.batch_size}, input "
          f"{'x'.join(map(str, batch.shape[2:]))}")
    print(f"model alone: {model_speed:.2f} images/s; predict end to end: {predict_speed:.2f} images/s "
          f"({100 * predict_speed / model_speed:.0f} % of the model alone)")


if __name__ == "__main__":
    main()
