"""Command line: a thin shell over the Python API (runs.py, detector.py, demo.py)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .backbone import BACKBONES
from .config import PRESETS, make_config
from .errors import InpformerError
from .runs import SETTINGS, test_run, train_run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inpformer", description="INP-Former visual anomaly detection")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train one model per category (single) or one for all (multi)")
    train.add_argument("--data", nargs="+", required=True, metavar="ROOT",
                       help="MVTec-layout dataset root(s) or a single category folder")
    train.add_argument("--categories", type=_comma_list, help="comma-separated subset of categories, e.g. a,b")
    train.add_argument("--setting", choices=SETTINGS, default="single")
    train.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    train.add_argument("--backbone", choices=sorted(BACKBONES))
    train.add_argument("--backbone-weights", metavar="PATH", help="local DINOv2 weights (.pth or .safetensors)")
    train.add_argument("--image-size", type=int, metavar="R", help="resize images to R x R")
    train.add_argument("--crop-size", type=int, metavar="C", help="centre crop C x C (a multiple of 14)")
    train.add_argument("--iterations", type=int, metavar="N", help="optimizer steps (overrides --epochs)")
    train.add_argument("--epochs", type=int, metavar="E")
    train.add_argument("--batch-size", type=int, metavar="B")
    train.add_argument("--lr", type=float, help="peak learning rate")
    train.add_argument("--final-lr", type=float, help="learning rate at the end of the cosine decay")
    train.add_argument("--warmup-iterations", type=int)
    train.add_argument("--weight-decay", type=float)
    train.add_argument("--grad-clip", type=float)
    train.add_argument("--num-inps", type=int, help="number of Intrinsic Normal Prototypes (paper: 6)")
    train.add_argument("--coherence-weight", type=float, help="INP coherence loss weight (paper: 0.2)")
    train.add_argument("--seed", type=int)
    train.add_argument("--no-feature-cache", dest="feature_cache", action="store_const", const=False,
                       help="recompute the frozen encoder at every step (slower; same result)")
    train.add_argument("--out", required=True, metavar="RUN_DIR")
    train.add_argument("--quiet", action="store_true", help="no progress bars")

    test = commands.add_parser("test", help="evaluate a run: metrics table, metrics.json/csv, scores.csv")
    test.add_argument("run_dir", metavar="RUN_DIR")
    test.add_argument("--data", nargs="+", metavar="ROOT", help="test data root(s); default: the training data")
    test.add_argument("--save-maps", action="store_true", help="also write RUN_DIR/maps.npz (maps and masks)")
    test.add_argument("--quiet", action="store_true")

    demo = commands.add_parser("demo", help="train and evaluate on the ELPV solar-cell images shipped by PyPI")
    demo.add_argument("--out", default="runs/demo", metavar="DIR")
    demo.add_argument("--iterations", type=int, default=None)
    demo.add_argument("--quiet", action="store_true")
    return parser


CONFIG_OPTIONS = ("backbone", "backbone_weights", "image_size", "crop_size", "iterations", "epochs", "batch_size",
                  "lr", "final_lr", "warmup_iterations", "weight_decay", "grad_clip", "num_inps",
                  "coherence_weight", "seed", "feature_cache")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            config = make_config(args.preset, **{k: getattr(args, k) for k in CONFIG_OPTIONS})
            train_run(args.data, args.out, config, args.setting, args.categories, progress=not args.quiet)
            print(f"trained; next: inpformer test {args.out}")
        elif args.command == "test":
            evaluation = test_run(args.run_dir, args.data, args.save_maps, progress=not args.quiet)
            print(evaluation.table())
        elif args.command == "demo":
            from .demo import run_demo

            print(run_demo(args.out, iterations=args.iterations, progress=not args.quiet).table())
    except InpformerError as error:
        print(f"inpformer: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("inpformer: interrupted", file=sys.stderr)
        return 130
    return 0


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


if __name__ == "__main__":
    sys.exit(main())
