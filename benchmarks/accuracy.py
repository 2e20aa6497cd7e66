"""Accuracy benchmark on real industrial images: train and test with a preset (default `cpu`), one model per
category (single) and one model for all categories (multi); prints a markdown table of measured numbers.

    python benchmarks/accuracy.py --data ../shared/datasets --out runs/accuracy
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from inpformer import DataSource, make_config, test_run, train_run
from inpformer.metrics import METRIC_NAMES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/datasets", help="MVTec-layout root with the categories")
    parser.add_argument("--categories", default="tire,magnetic_tile")
    parser.add_argument("--settings", default="single,multi")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--iterations", type=int, help="override the preset's iterations")
    parser.add_argument("--out", default="runs/accuracy")
    args = parser.parse_args()

    categories = args.categories.split(",")
    config = make_config(args.preset, iterations=args.iterations)
    rows = []
    for setting in args.settings.split(","):
        run_dir = Path(args.out) / setting
        run = train_run([DataSource(args.data)], run_dir, config, setting, categories, progress=False)
        start = time.perf_counter()
        evaluation = test_run(run_dir, progress=False)
        test_seconds = time.perf_counter() - start
        num_images = sum(len(s.samples) for s in evaluation.images)
        for category, metrics in evaluation.metrics.items():
            model = category if setting == "single" else "all"
            rows.append({"setting": setting, "category": category, **metrics,
                         "train_min": run["train_seconds"][model] / 60, "test_img_s": num_images / test_seconds})
        rows.append({"setting": setting, "category": "mean", **evaluation.mean,
                     "train_min": sum(run["train_seconds"].values()) / 60, "test_img_s": num_images / test_seconds})

    header = ["setting", "category", *METRIC_NAMES, "train min", "test img/s"]
    print(f"preset {args.preset}, {config.iterations} iterations x batch {config.batch_size}, "
          f"backbone {config.backbone}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        values = [f"{100 * row[m]:.1f}" for m in METRIC_NAMES]
        print(f"| {row['setting']} | {row['category']} | " + " | ".join(values)
              + f" | {row['train_min']:.1f} | {row['test_img_s']:.1f} |")
    (Path(args.out) / "accuracy.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
