"""Learning curves from benchmarks/budget.py's JSON files: I-AUROC and P-AUROC against training minutes (the
CPU budget), one row of plots per category, the nearest-neighbour baselines as markers at their cost; and the
same numbers as a markdown table on standard output.

    python benchmarks/plot_budget.py runs/budget/*.json --out docs/images/learning_curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from inpformer.data.geometry import format_size, parse_size

METRICS = ("I-AUROC", "P-AUROC")
ALL_METRICS = ("I-AUROC", "I-AP", "P-AUROC", "AUPRO")


def label(config: dict) -> str:
    size = format_size(parse_size(config["crop_size"]))
    return f"{size} {config.get('resize_mode', 'stretch')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()

    by_category: dict[str, list[dict]] = {}
    for path in args.results:
        result = json.loads(path.read_text())
        by_category.setdefault(Path(result["data"]).name, []).append(result)
    figure, axes = plt.subplots(len(by_category), len(METRICS), figsize=(11, 4 * len(by_category)), squeeze=False)
    for row, (category, results) in zip(axes, sorted(by_category.items()), strict=True):
        for axis, metric in zip(row, METRICS, strict=True):
            for colour, result in enumerate(results):
                curves: dict[str, list[dict]] = {}
                for point in result["rows"]:
                    curves.setdefault(point["method"], []).append(point)
                for style, (method, points) in enumerate(curves.items()):
                    x = [p["train_min"] for p in points]
                    y = [100 * p[metric] for p in points]
                    baseline = method.startswith("nearest")
                    axis.plot(x, y, "*" if baseline else "o" + ("-", "--", ":")[style % 3], color=f"C{colour}",
                              markersize=12 if baseline else 5, label=f"{label(result['config'])}, {method}")
                    for p, xi, yi in zip(points, x, y, strict=True):
                        if not baseline:
                            axis.annotate(str(p["steps"]), (xi, yi), textcoords="offset points", xytext=(3, 3),
                                          fontsize=7)
            axis.set_title(f"{category}: {metric}")
            axis.set_xlabel("training minutes on 2 CPU cores (encoding + steps; labels: steps)")
            axis.set_ylabel(metric)
            axis.grid(alpha=0.3)
        row[0].legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}\n")
    print("| category | input | method | steps | train min | " + " | ".join(ALL_METRICS) + " |")
    print("|---|---|---|---|---|" + "---|" * len(ALL_METRICS))
    for category, results in sorted(by_category.items()):
        for result in results:
            for point in result["rows"]:
                values = " | ".join(f"{100 * point[m]:.1f}" for m in ALL_METRICS)
                print(f"| {category} | {label(result['config'])} | {point['method']} | {point['steps'] or '-'} | "
                      f"{point['train_min']:.1f} | {values} |")


if __name__ == "__main__":
    main()
