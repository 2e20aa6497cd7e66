"""Evaluation at scale: streams N synthetic 256x256 anomaly maps and defect masks (elliptic blobs) through
MetricAccumulator in batches, as the detector does per category; prints measured seconds and peak memory.

Peak memory is tracemalloc's peak of traced allocations (numpy arrays included) during add/compute, and the
process's maximum resident set size (resource.getrusage, which includes the Python and library baseline).

    python benchmarks/metrics_scale.py --images 1000
"""

from __future__ import annotations

import argparse
import resource
import time
import tracemalloc

import numpy as np

from inpformer.metrics import METRIC_NAMES, MetricAccumulator, compute_metrics, image_metrics


def synthetic_batch(rng: np.random.Generator, n: int, size: int, defective: float = 0.5):
    """(labels, scores, masks uint8, maps float32): smooth noise plus a bump over each of 1-3 elliptic defects."""
    labels = (rng.random(n) < defective).astype(np.int64)
    coarse = rng.random((n, 9, 9), dtype=np.float32)
    upsample = np.stack([np.interp(np.linspace(0, 8, size), np.arange(9), row) for row in np.eye(9)], axis=1)
    maps = np.einsum("yi,nij,xj->nyx", upsample, coarse, upsample, optimize=True).astype(np.float32)  # bilinear
    maps += 0.05 * rng.random(maps.shape, dtype=np.float32)
    masks = np.zeros((n, size, size), dtype=bool)
    yy, xx = np.mgrid[:size, :size]
    for i in np.flatnonzero(labels):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0, size, 2)
            ry, rx = rng.uniform(2, size / 8, 2)
            box = np.s_[max(int(cy - 2 * ry), 0):int(cy + 2 * ry) + 1, max(int(cx - 2 * rx), 0):int(cx + 2 * rx) + 1]
            distance = ((yy[box] - cy) / ry) ** 2 + ((xx[box] - cx) / rx) ** 2  # 1 on the border, 4 at the box
            masks[i][box] |= distance <= 1
            maps[i][box] += rng.uniform(0.2, 1.0) * np.clip(1 - distance / 4, 0, None).astype(np.float32)
    return labels, maps.max(axis=(1, 2)), masks.astype(np.uint8), maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8, help="images per add() call, as the detector's batches")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--float32", action="store_true",
                        help="also keep all float32 maps and compare with compute_metrics on them (in memory)")
    args = parser.parse_args()

    imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # inpformer imports torch
    rng = np.random.default_rng(args.seed)
    accumulator = MetricAccumulator()
    kept: dict[str, list[np.ndarray]] = {"labels": [], "scores": [], "masks": [], "maps": []}
    add_seconds, peak = 0.0, 0
    tracemalloc.start()
    for start in range(0, args.images, args.batch):
        labels, scores, masks, maps = synthetic_batch(rng, min(args.batch, args.images - start), args.size)
        maps16 = maps.astype(np.float16)
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        begin = time.perf_counter()
        accumulator.add(labels, scores, masks, maps16)
        add_seconds += time.perf_counter() - begin
        peak = max(peak, tracemalloc.get_traced_memory()[1] - held)
        kept["labels"].append(labels)
        kept["scores"].append(scores)
        if args.float32:
            kept["masks"].append(masks)
            kept["maps"].append(maps)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    begin = time.perf_counter()
    result = accumulator.compute()
    compute_seconds = time.perf_counter() - begin
    peak = max(peak, tracemalloc.get_traced_memory()[1] - held)
    tracemalloc.stop()
    begin = time.perf_counter()
    image_metrics(np.concatenate(kept["labels"]), np.concatenate(kept["scores"]))
    image_seconds = time.perf_counter() - begin

    pixels = args.images * args.size**2
    print(f"{args.images} maps of {args.size}x{args.size} ({pixels / 1e6:.1f} M pixels), batches of {args.batch}; "
          f"as float16 they would take {pixels * 2 / 2**20:.1f} MiB")
    print(f"add (pixel counts, defect regions): {add_seconds:8.2f} s")
    print(f"compute (all seven metrics):        {compute_seconds:8.3f} s (image metrics alone: {image_seconds:.4f} s)")
    print(f"total:                              {add_seconds + compute_seconds:8.2f} s")
    print(f"accumulator state:                  {accumulator.nbytes / 2**20:8.1f} MiB")
    print(f"peak memory of add/compute:         {peak / 2**20:8.1f} MiB (tracemalloc, above what each call started "
          "with: the batch and the state)")
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"max resident set (getrusage):       {maxrss:8.1f} MiB (whole process; {imported:.1f} MiB after imports)")
    print("float16 accumulator: " + "  ".join(f"{name} {value:.6f}" for name, value in result.items()))
    if args.float32:
        begin = time.perf_counter()
        exact = compute_metrics(*(np.concatenate(kept[k]) for k in ("labels", "scores", "masks", "maps")))
        print(f"compute_metrics on the float32 maps: {time.perf_counter() - begin:.2f} s")
        print("float16 - float32:   " + "  ".join(f"{m} {result[m] - exact[m]:+.1e}" for m in METRIC_NAMES))


if __name__ == "__main__":
    main()
