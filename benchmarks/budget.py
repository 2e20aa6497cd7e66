"""Accuracy at a CPU budget: INP-Former learning curves beside a nearest-neighbour baseline on the same frozen
features, input geometry and evaluation code.

The frozen encoder runs once over the fitted training images and the test images; then
- the baseline (no training): each test token's distance to a memory bank of training tokens, 1 - max cosine,
  on the mean of the 8 encoder layers (the decoder's input). The bank is a PatchCore-style greedy coreset
  (`--bank-size` tokens, chosen from a random pool 4x larger, in a 128-d random projection); `--bank-size 0`
  keeps every training token (exact nearest neighbour, slow at large inputs);
- INP-Former trains from the cached features and is evaluated at each of `--steps` (one run of max(steps)
  steps: an earlier point has not finished its cosine schedule, so it is a slightly pessimistic estimate of a
  run of that length);
both through `AnomalyScorer` (upsampling, blur, top-1 % score) and `MetricAccumulator`, as `inpformer test`, with
the I-AUROC within subsets of the test set too (each defect type with the good images; thirds by image area).

    python benchmarks/budget.py --data ../shared/datasets/magnetic_tile --image-size 224 --steps 250,500,1000 \\
        --out runs/budget/mt_224.json
    python benchmarks/budget.py --data ../shared/datasets/tire --image-size 448 --train-tokens 256 ...
    python benchmarks/budget.py --data demo --steps 200 --seeds 0,1 --pos-embed size --out runs/budget/demo_size.json
    python benchmarks/budget.py --data ../shared/datasets/tire --steps 400 --variants warmup25:warmup_iterations=25 ...

`--data demo` is `make demo`'s data (ELPV cells, image labels only: pixel metrics are NaN). `--variants` trains one
curve per `NAME:KEY=VALUE,...` (config fields changed from the preset; `preset` alone is the preset itself) and
`--seeds` repeats each with other seeds (initialisation, data order, token subsets), all from one feature cache.
`--features FILE` keeps that cache on disk for the next run with the same data and input (about 3 MB per image at
448 px), which then starts training at once; its train minutes still count the first run's encoding.

Train minutes at each point = encoding the training images + the optimizer steps so far (evaluation excluded);
run it alone on the machine (the timings are wall-clock).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from inpformer import backbone, load_mvtec, make_config
from inpformer.backbone import load_encoder
from inpformer.data.geometry import format_size
from inpformer.data.images import ImageDataset, Preprocess
from inpformer.demo import elpv_samples
from inpformer.detector import split_validation
from inpformer.files import write_atomically
from inpformer.metrics import METRIC_NAMES, MetricAccumulator
from inpformer.model import INPFormerNet
from inpformer.scoring import AnomalyScorer, valid_pixels
from inpformer.training import encode_dataset, seed_everything, train

POS_EMBED_HELP = ("position embeddings: DINOv2's interpolation (scale (n + 0.1) / N), or resampled to the exact "
                  "grid size (timm's resample_abs_pos_embed without antialiasing, used before)")


def use_pos_embed(kind: str) -> None:
    """For this process: "dinov2" (the product's) or "size", the exact-size resampling the encoder used before."""
    if kind == "size":  # offset 0: scale n / N, i.e. exactly the n x n output grid's sampling positions
        backbone.dinov2_pos_embed = functools.partial(backbone.dinov2_pos_embed, offset=0.0)


def greedy_coreset(features: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """PatchCore's greedy k-center selection (in a 128-d random projection) of `size` rows of `features`."""
    generator = torch.Generator().manual_seed(seed)
    projection = torch.randn(features.shape[1], 128, generator=generator) / 128**0.5
    projected = features @ projection
    norms = projected.square().sum(dim=1)
    chosen = [int(torch.randint(len(features), (1,), generator=generator))]
    distance = torch.full_like(norms, float("inf"))
    for _ in range(size):  # squared distances: |a|^2 + |b|^2 - 2 a.b, one matrix-vector product per point
        latest = chosen[-1]
        distance = torch.minimum(distance, norms + norms[latest] - 2 * (projected @ projected[latest]))
        chosen.append(int(distance.argmax()))
    return features[chosen[:size]]


class NearestNeighbour:
    """The baseline: token distance to the memory bank, 1 - max cosine."""

    def __init__(self, train_tokens: torch.Tensor, bank_size: int, seed: int = 0):
        tokens = F.normalize(train_tokens.reshape(-1, train_tokens.shape[-1]), dim=-1)
        if bank_size and bank_size < len(tokens):
            generator = torch.Generator().manual_seed(seed)
            pool = tokens[torch.randperm(len(tokens), generator=generator)[: 4 * bank_size]]
            tokens = F.normalize(greedy_coreset(pool, bank_size, seed), dim=-1)
        self.bank = tokens

    def distances(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T, C] -> [B, T]."""
        flat = F.normalize(tokens.reshape(-1, tokens.shape[-1]), dim=-1)
        best = torch.cat([(chunk @ self.bank.T).amax(dim=1) for chunk in flat.split(4096)])
        return (1 - best).reshape(tokens.shape[:2])


def encode_test(net: INPFormerNet, preprocess: Preprocess, samples, map_shape: tuple[int, int]):
    """Cached encoder features, labels, masks and valid pixels (at the map's shape) of the test images."""
    loader = DataLoader(ImageDataset(samples, preprocess, with_masks=True), batch_size=16)
    features, labels, masks, valid = [], [], [], []
    with torch.inference_mode():
        for batch in loader:
            features.append(net.encode(batch["image"]))
            labels.append(batch["label"].numpy())
            mask = F.interpolate(batch["mask"][:, None].float(), size=map_shape, mode="nearest")[:, 0]
            masks.append(mask.to(torch.uint8).numpy())
            valid.append(batch["valid"])
    return torch.cat(features), np.concatenate(labels), np.concatenate(masks), torch.cat(valid)


def evaluate(token_maps_of, features: torch.Tensor, labels, masks, valid, scorer: AnomalyScorer,
             subsets: dict[str, np.ndarray]) -> dict:
    """Metrics of the maps `token_maps_of(features batch)` gives ([B, groups, rows, columns]), plus the I-AUROC
    within each of `subsets` (boolean masks over the test images)."""
    accumulator, scores = MetricAccumulator(), []
    with torch.inference_mode():
        for start in range(0, len(features), 16):
            part = slice(start, start + 16)
            maps = scorer.maps(token_maps_of(features[part]), valid[part])
            scores.append(scorer.scores(maps, valid[part]).numpy())
            accumulator.add(labels[part], scores[-1], masks[part], maps.numpy(),
                            valid_pixels(valid[part], scorer.map_shape).numpy())
    scores = np.concatenate(scores)
    by_subset = {name: float(roc_auc_score(labels[inside], scores[inside])) for name, inside in subsets.items()
                 if len(set(labels[inside])) == 2}
    return {**accumulator.compute(), "I-AUROC by subset": by_subset}


def breakdown_subsets(samples) -> dict[str, np.ndarray]:
    """Where a detector loses: each defect type with every good image, and, when the images' sizes differ, each
    third of them by area (good and defective alike)."""
    types = [sample.defect_type for sample in samples]
    subsets = {kind: np.isin(types, [kind, "good"]) for kind in sorted(set(types) - {"good"})}
    areas = np.array([_area(sample.path) for sample in samples])
    if len(set(areas)) > 1:
        thirds = np.digitize(areas, np.quantile(areas, [1 / 3, 2 / 3]))
        for third in np.unique(thirds):
            inside = thirds == third
            subsets[f"area {areas[inside].min()}-{areas[inside].max()} px"] = inside
    return subsets


def _area(path: Path) -> int:
    with Image.open(path) as image:  # reads the header only
        return math.prod(image.size)


def learning_curve(net: INPFormerNet, train_set, train_features: torch.Tensor, config, steps: list[int],
                   cache_seconds: float, test_data, scorer: AnomalyScorer, subsets: dict[str, np.ndarray],
                   label: str) -> list[dict]:
    """Trains `net` for max(steps) steps from the cached features, evaluating after each of `steps`."""
    rows, clock = [], {"train": 0.0, "since": time.perf_counter()}

    def on_step(done: int, model: INPFormerNet) -> None:
        if done not in steps:
            return
        clock["train"] += time.perf_counter() - clock["since"]
        model.eval()
        metrics = evaluate(lambda f: scorer.token_maps(model.decode(f)), *test_data, scorer, subsets)
        model.train()
        rows.append({"method": f"INP-Former ({label})", "seed": config.seed, "steps": done,
                     "train_min": (cache_seconds + clock["train"]) / 60, "step_s": clock["train"] / done, **metrics})
        print(_format(rows[-1]), flush=True)
        clock["since"] = time.perf_counter()

    train(net, train_set, dataclasses.replace(config, iterations=max(steps)), progress=False, on_step=on_step,
          features=train_features)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="one MVTec-layout category folder")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--image-size", help="R or HxW (no crop)")
    parser.add_argument("--resize-mode", choices=("stretch", "pad"))
    parser.add_argument("--train-tokens", default="preset",
                        help="decoder tokens per image per step, 'all', or the preset's; a comma list trains one "
                             "model each")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--encoding", choices=("fp32", "bf16"), default="fp32",
                        help="arithmetic of the training images' encoding (bf16: autocast; an experiment, the "
                             "product encodes in fp32); the test images are always encoded in fp32")
    parser.add_argument("--steps", default="250,500,1000",
                        help="evaluate INP-Former after these steps (0: train none); a ';'-separated list gives "
                             "one per --train-tokens")
    parser.add_argument("--variants", nargs="+", default=["preset"],
                        help="NAME:KEY=VALUE,... config changes, one curve each (with a single --train-tokens)")
    parser.add_argument("--seeds", default=None, help="comma list of seeds (default: the preset's)")
    parser.add_argument("--pos-embed", choices=("dinov2", "size"), default="dinov2", help=POS_EMBED_HELP)
    parser.add_argument("--bank-size", type=int, default=16384, help="baseline memory bank (0: every token)")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--features", help="file keeping the encoded features between runs: read when it exists "
                                           "(same data, input and position embeddings), else written")
    parser.add_argument("--out", required=True, help="JSON file for the results")
    args = parser.parse_args()

    tokens_list = args.train_tokens.split(",")
    steps_list = [sorted(int(s) for s in part.split(",")) for part in args.steps.split(";")]
    if len(steps_list) == 1:
        steps_list *= len(tokens_list)
    if len(steps_list) != len(tokens_list):
        parser.error("give one --steps list, or one per --train-tokens value (separated by ';')")
    if args.variants != ["preset"] and len(tokens_list) > 1:
        parser.error("--variants goes with a single --train-tokens value")
    variants = dict(_variant(text) for text in args.variants)
    use_pos_embed(args.pos_embed)
    config = make_config(args.preset, image_size=args.image_size, resize_mode=args.resize_mode,
                         batch_size=args.batch_size)
    seed_everything(config.seed)
    encoder, _ = load_encoder(config.backbone, config.crop_size, config.backbone_weights)
    net = INPFormerNet(encoder, encoder.embed_dim, encoder.num_heads, config.num_inps, config.decoder_depth)
    preprocess = Preprocess(config.image_size, config.crop_size, resize_mode=config.resize_mode)
    scorer = AnomalyScorer(config.crop_size, config.map_size, config.blur_kernel, config.blur_sigma, config.top_ratio)
    train_samples, test = elpv_samples() if args.data == "demo" else (load_mvtec(args.data, "train"),
                                                                       load_mvtec(args.data, "test"))
    fitting, _ = split_validation(train_samples, config.val_fraction, config.seed)

    train_set = ImageDataset(fitting, preprocess)
    key = {"data": args.data if args.data == "demo" else str(Path(args.data).resolve()), "pos_embed": args.pos_embed,
           "preprocess": [config.backbone, config.image_size, config.crop_size, config.resize_mode, config.map_size],
           "images": [len(fitting), len(test)], "train_encoding": args.encoding}
    if args.features and Path(args.features).is_file():
        saved = torch.load(args.features, weights_only=True)  # written below by this script
        if saved["key"] != key:
            parser.error(f"--features {args.features}: encoded with other settings ({saved['key']}); pass another file")
        train_features, cache_seconds = saved["train"], saved["cache_seconds"]
        test_data = (saved["test"], saved["labels"].numpy(), saved["masks"].numpy(), saved["valid"])
    else:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.encoding == "bf16"):  # this thread's encoder
            train_features = encode_dataset(net, train_set, progress=False)
        cache_seconds = time.perf_counter() - start
        test_data = encode_test(net, preprocess, test, scorer.map_shape)
        if args.features:
            saved = {"key": key, "train": train_features, "cache_seconds": cache_seconds, "test": test_data[0],
                     "labels": torch.from_numpy(test_data[1]), "masks": torch.from_numpy(test_data[2]),
                     "valid": test_data[3]}
            write_atomically(args.features, lambda temporary: torch.save(saved, temporary))
    test_features = test_data[0]
    subsets = breakdown_subsets(test)
    print(f"{Path(args.data).name} (position embeddings: {args.pos_embed}): {len(fitting)} training, "
          f"{len(test)} test images at "
          f"{format_size(preprocess.crop_size)} ({config.resize_mode}), "
          f"{test_features.shape[2]} tokens; encoding the training images took {cache_seconds:.0f} s", flush=True)
    rows = []
    if not args.no_baseline:
        start = time.perf_counter()
        baseline = NearestNeighbour(train_features.mean(dim=1), args.bank_size, config.seed)
        bank_seconds = time.perf_counter() - start
        start = time.perf_counter()
        metrics = evaluate(lambda f: scorer.to_grid(baseline.distances(f.mean(dim=1))[:, None]), *test_data, scorer,
                           subsets)
        rows.append({"method": f"nearest neighbour (bank {len(baseline.bank)})", "steps": 0,
                     "train_min": (cache_seconds + bank_seconds) / 60,
                     "search_ms_per_image": 1000 * (time.perf_counter() - start) / len(test), **metrics})
        print(_format(rows[-1]), flush=True)

    seeds = [config.seed] if args.seeds is None else [int(seed) for seed in args.seeds.split(",")]
    for train_tokens, steps in zip(tokens_list, steps_list, strict=True):
        if steps == [0]:  # the baseline alone
            continue
        for (name, changes), seed in ((variant, seed) for variant in variants.items() for seed in seeds):
            tokens = {"preset": config.train_tokens, "all": None}.get(train_tokens, train_tokens)
            tokens = None if tokens is None else int(tokens)
            run_config = dataclasses.replace(config, **{"train_tokens": tokens, "seed": seed, **changes})
            seed_everything(run_config.seed)
            net = INPFormerNet(encoder, encoder.embed_dim, encoder.num_heads, config.num_inps, config.decoder_depth)
            label = f"{name}, train tokens {run_config.train_tokens or 'all'}"
            rows += learning_curve(net, train_set, train_features, run_config, steps, cache_seconds, test_data,
                                   scorer, subsets, label)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"data": args.data, "pos_embed": args.pos_embed, "config": config.to_dict(),
                                          "rows": rows}, indent=2))


def _variant(text: str) -> tuple[str, dict]:
    """`NAME:KEY=VALUE,...` -> (NAME, {KEY: VALUE parsed as JSON, else the text}); `NAME` alone changes nothing."""
    name, _, assignments = text.partition(":")
    changes = {}
    for assignment in filter(None, assignments.split(",")):
        key, _, value = assignment.partition("=")
        try:
            changes[key] = json.loads(value)
        except json.JSONDecodeError:
            changes[key] = value
    return name, changes


def _format(row: dict) -> str:
    metrics = " ".join(f"{name} {100 * row[name]:5.1f}" for name in METRIC_NAMES)
    subsets = ", ".join(f"{name} {100 * value:.1f}" for name, value in row["I-AUROC by subset"].items())
    return (f"{row['method']:<48} seed {row.get('seed', '-')!s:>3} steps {row['steps']:>5}  "
            f"train {row['train_min']:5.1f} min  {metrics}\n    I-AUROC by subset: {subsets}")


if __name__ == "__main__":
    main()
