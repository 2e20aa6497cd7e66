"""Few-shot and zero-shot benchmark on real industrial images; prints a markdown table of measured numbers.

Few-shot: K good images per category (drawn with the seed), each expanded x22, one model on the union of the
categories, `--repeats` independent draws reported as mean ± std. Zero-shot: each single-class model of a run
(by default the one `benchmarks/accuracy.py` wrote; trained here if missing) applied to the other category.

    python benchmarks/settings.py --data ../shared/datasets --out runs/settings
    # the previous cpu preset, few-shot only (the before/after table of the few-shot expansion in docs/)
    python benchmarks/settings.py --image-size 224 --resize-mode stretch --train-tokens all --no-zero-shot
    # the same with the encoder's previous position embeddings (to change one thing at a time against old numbers)
    python benchmarks/settings.py --image-size 224 --resize-mode stretch --train-tokens all --no-zero-shot \
        --shots 1 --pos-embed size
"""

from __future__ import annotations

import argparse
from pathlib import Path

from budget import POS_EMBED_HELP, use_pos_embed

from inpformer import DataSource, Evaluation, make_config, test_run, train_run
from inpformer.metrics import METRIC_NAMES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/datasets")
    parser.add_argument("--categories", default="tire,magnetic_tile")
    parser.add_argument("--shots", default="4,1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=200, help="few-shot optimizer steps per model")
    parser.add_argument("--single-run", default="runs/accuracy/single",
                        help="run with one model per category, for zero-shot (trained if missing)")
    parser.add_argument("--image-size", help="override the cpu preset's input size, e.g. 224")
    parser.add_argument("--resize-mode", choices=("stretch", "pad"))
    parser.add_argument("--train-tokens", help="a count or 'all'")
    parser.add_argument("--no-zero-shot", dest="zero_shot", action="store_false")
    parser.add_argument("--pos-embed", choices=("dinov2", "size"), default="dinov2", help=POS_EMBED_HELP)
    parser.add_argument("--out", default="runs/settings")
    args = parser.parse_args()
    use_pos_embed(args.pos_embed)
    tokens = args.train_tokens
    overrides = {"image_size": args.image_size, "resize_mode": args.resize_mode,
                 "train_tokens": int(tokens) if tokens and tokens.isdigit() else tokens}

    sources = [DataSource(args.data)]
    categories = args.categories.split(",")
    results: list[tuple[str, Evaluation]] = []
    for shots in map(int, args.shots.split(",")):
        run_dir = Path(args.out) / f"{shots}-shot"
        config = make_config("cpu", iterations=args.iterations, **overrides)
        train_run(sources, run_dir, config, "few-shot", categories, shots=shots, repeats=args.repeats,
                  progress=False)
        results.append((f"{shots}-shot ({args.repeats} draws, {args.iterations} it)",
                        test_run(run_dir, progress=False)))

    single = Path(args.single_run)
    if args.zero_shot and not (single / "run.json").is_file():
        train_run(sources, single, make_config("cpu", **overrides), "single", categories, progress=False)
    for source_category in categories if args.zero_shot else []:
        for target in categories:
            if target != source_category:
                evaluation = test_run(single, sources, [target], model=source_category, zero_shot=True,
                                      out=Path(args.out) / f"zero-shot-{source_category}-to-{target}",
                                      progress=False)
                results.append((f"zero-shot {source_category} → {target}", evaluation))

    print("| setting | category | " + " | ".join(METRIC_NAMES) + " |")
    print("|---|---|" + "---|" * len(METRIC_NAMES))
    for name, evaluation in results:
        for category, values, std in evaluation.rows():
            cells = [f"{100 * values[m]:.1f}" + (f" ± {100 * std[m]:.1f}" if std else "") for m in METRIC_NAMES]
            print(f"| {name} | {category} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
