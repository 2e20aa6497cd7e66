"""Speed benchmark: counted FLOPs per image, the machine's fp32 GEMM throughput, inference images/s (PyTorch,
ONNX fp32 and int8) with the fraction of the hardware limit they reach, and training seconds per step with and
without the feature cache. Prints measured numbers only, then the targets to compare them with.

The decoder is randomly initialised (speed does not depend on training). Inference inputs are preprocessed random
tensors unless stated; with --data, one more line includes reading and preprocessing real files, and training
reads real images. Throughput is the best of the timed repeats (the median is shown beside it).

    python benchmarks/speed.py                      # cpu preset, ViT-S/14 at 224
    python benchmarks/speed.py --quick              # smoke run, few repeats
    python benchmarks/speed.py --data ../shared/datasets/tire
    python benchmarks/speed.py --preset paper --device cuda --batches 1,16
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import timm
import torch
from torch.utils.data import Dataset
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from inpformer import INPFormer
from inpformer.backbone import BACKBONES, Encoder
from inpformer.config import Config, make_config
from inpformer.data.geometry import Size, format_size
from inpformer.data.images import ImageDataset, load_mvtec, read_image
from inpformer.errors import InpformerError
from inpformer.export import OnnxRuntime, export_onnx
from inpformer.model import INPFormerNet
from inpformer.quantize import quantize_int8
from inpformer.runtime import InferenceGraph, RuntimeOutput, TorchRuntime, full_boxes
from inpformer.training import train

TARGETS = """targets (2-core AVX2 CPU):
  training        <= 1.8 s/step at batch 8 (anomalib: 2.7 s/step)
  fp32 inference  >= 7 images/s at batch 8 at 224 px (anomalib: 6.1 images/s); at other sizes, scale by FLOPs
  efficiency      >= 85% of the hardware limit (images/s x FLOPs/image / GEMM FLOP/s)
  int8 inference  >= 1.5x fp32"""


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


# FlopCounterMode has formulas for the CUDA attention kernels but not for the CPU one, which timm's ViT uses.
_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def count_flops(graph: InferenceGraph, input_size: Size, device: torch.device) -> tuple[int, int]:
    """(FLOPs of the whole graph, FLOPs of its encoder) for one image, counted on the executed operators."""
    images = torch.randn(1, 3, *input_size, device=device)
    # not under inference_mode: FlopCounterMode's module tracker needs autograd to attribute FLOPs to modules
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        graph(images, torch.from_numpy(full_boxes(images)).to(device))
    counts = counter.get_flop_counts()
    return counter.get_total_flops(), sum(counts.get("InferenceGraph.net.encoder", {}).values())


def _synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()


def _times(fn: Callable[[], object], repeats: int, device: torch.device | None = None) -> list[float]:
    """Seconds per call of `fn`, after one untimed warm-up call."""
    fn()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def gemm_flops_per_second(device: torch.device, repeats: int) -> float:
    """fp32 throughput of large square matrix products, best of `repeats` (all threads of this process)."""
    n = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n**3 / min(_times(lambda: torch.matmul(a, b), repeats, device))


class _DeviceRuntime:
    """The PyTorch runtime on a GPU: numpy in, numpy out, like TorchRuntime (which runs on the CPU)."""

    def __init__(self, graph: InferenceGraph, device: torch.device):
        self.graph, self.device = graph.to(device).eval(), device

    def __call__(self, images: np.ndarray) -> RuntimeOutput:
        with torch.inference_mode():
            maps, scores, _, embeddings = self.graph(torch.from_numpy(images).to(self.device),
                                                     torch.from_numpy(full_boxes(images)).to(self.device))
        return RuntimeOutput(maps.cpu().numpy(), scores.cpu().numpy(), embeddings.cpu().numpy())


class _RandomImages(Dataset):
    """Preprocessed random images, in the item format of ImageDataset."""

    def __init__(self, count: int, size: Size):
        self.images = torch.randn(count, 3, *size, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": 0, "index": index}


def build_net(config: Config) -> tuple[INPFormerNet, str]:
    """The network of `config` with a random decoder; a random backbone when no weights are found offline
    (speed does not depend on them)."""
    try:
        detector = INPFormer.from_config(config)
        return detector._build(), detector.backbone_source
    except InpformerError as error:
        spec = BACKBONES[config.backbone]
        vit = timm.create_model(spec.timm_name, pretrained=False, **spec.timm_kwargs)
        encoder = Encoder(vit, spec.layers, config.crop_size)
        net = INPFormerNet(encoder, encoder.embed_dim, encoder.num_heads, config.num_inps, config.decoder_depth)
        return net, f"random initialisation ({str(error)[:60]}...)"


def _throughput_line(name: str, batch: int, times: list[float], flops: float, gemm: float) -> str:
    best, median = batch / min(times), batch / statistics.median(times)
    line = f"  {name:<22} batch {batch:>2}: {best:7.2f} images/s (median {median:6.2f})"
    return line if name.endswith("int8") else line + f", {100 * best * flops / gemm:5.1f}% of the fp32 GEMM limit"


def benchmark_inference(runtimes: dict[str, Callable], config: Config, flops: float, gemm: float,
                        batches: list[int], repeats: dict[int, int], device: torch.device) -> None:
    rng = np.random.default_rng(0)
    speeds = {}
    for name, runtime in runtimes.items():
        for batch in batches:
            images = rng.standard_normal((batch, 3, *config.geometry().crop_size), dtype=np.float32)
            times = _times(partial(runtime, images), repeats[batch], device)
            speeds[name, batch] = batch / min(times)
            line = _throughput_line(name, batch, times, flops, gemm)
            if name.endswith("int8") and ("onnx fp32", batch) in speeds:
                line += f", {speeds[name, batch] / speeds['onnx fp32', batch]:.2f}x onnx fp32"
            print(line, flush=True)


def benchmark_with_decoding(runtime: Callable, data: Path, config: Config, flops: float, gemm: float,
                            batch: int, repeats: int) -> None:
    """Reading + preprocessing + PyTorch inference of `data`'s training files, in one process, `batch` at a time."""
    files = [sample.path for sample in load_mvtec(data, "train")[:batch]]
    preprocess = INPFormer.from_config(config).preprocess

    def run() -> None:
        runtime(torch.stack([preprocess(read_image(f)) for f in files]).numpy())

    times = _times(run, repeats)
    print(_throughput_line("torch + decoding", len(files), times, flops, gemm), flush=True)


def training_seconds_per_step(net: INPFormerNet, dataset: Dataset, config: Config, cache: bool,
                              steps: int) -> tuple[float, float]:
    """(median seconds per step after the first, one-off cache seconds), from the times at which training calls
    `net.decode`, once per step (the wrapper is left out of torch.compile, which still compiles `decode`)."""
    starts: list[float] = []
    decode = net.decode
    tick = torch.compiler.disable(lambda: starts.append(time.perf_counter()))

    def timed_decode(*args):
        tick()
        return decode(*args)

    net.decode = timed_decode
    try:
        log = train(net, dataset, dataclasses.replace(config, iterations=steps + 2, epochs=None, feature_cache=cache),
                    progress=False)
    finally:
        del net.decode
    return statistics.median(np.diff(starts)[1:]), log.cache_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--backbone", help="override the preset's backbone")
    parser.add_argument("--image-size", help="override the preset's resize (R or HxW)")
    parser.add_argument("--crop-size", help="override the preset's crop (the model's input size)")
    parser.add_argument("--train-tokens", type=int, help="override the preset's decoder tokens per training image")
    parser.add_argument("--batch-size", type=int, help="training batch (default: the preset's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, help="PyTorch and ONNX Runtime threads (default: theirs)")
    parser.add_argument("--runtimes", help="comma-separated of torch,onnx,int8 (default: all on cpu, torch on cuda)")
    parser.add_argument("--data", type=Path, help="MVTec-layout category folder: real files for the decoding "
                                                  "line and for training")
    parser.add_argument("--no-training", action="store_true", help="skip the training measurements")
    parser.add_argument("--quick", action="store_true", help="few repeats (a smoke run, noisy numbers)")
    parser.add_argument("--batches", default="1,8", help="inference batch sizes (e.g. 1,16 on a GPU)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    config = make_config(args.preset, backbone=args.backbone, image_size=args.image_size, crop_size=args.crop_size,
                         batch_size=args.batch_size, device=args.device, train_tokens=args.train_tokens)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    runtimes = (args.runtimes or ("torch,onnx,int8" if device.type == "cpu" else "torch")).split(",")
    repeats = {b: (3 if args.quick else 20) if b == 1 else (2 if args.quick else 10) for b in batches}
    size = config.geometry().crop_size

    net, source = build_net(config)
    graph = InferenceGraph(net, INPFormer.from_config(config).scorer).to(device).eval()
    flops, encoder_flops = count_flops(graph, size, device)
    gemm = gemm_flops_per_second(device, 3 if args.quick else 10)
    hardware = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"machine: {hardware}, {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}), torch "
          f"{torch.__version__} with {torch.get_num_threads()} threads, device {device}")
    blocks = len(net.encoder.vit.blocks)
    print(f"model: preset {args.preset}, {config.backbone} (weights: {source}), input {format_size(size)}, "
          f"encoder runs blocks 0..{blocks - 1} (features of blocks {', '.join(map(str, net.encoder.layers))})")
    print(f"FLOPs per image (counted): {flops / 2e9:.3f} GMAC = {flops / 1e9:.2f} GFLOP; encoder "
          f"{encoder_flops / 2e9:.3f} GMAC, extractor + decoder + scoring {(flops - encoder_flops) / 2e9:.3f} GMAC")
    print(f"fp32 GEMM throughput (best of {3 if args.quick else 10}): {gemm / 1e9:.1f} GFLOP/s "
          f"-> limit {gemm / flops:.2f} images/s")

    print("inference (preprocessed random inputs, best of " + " / ".join(f"{repeats[b]} at batch {b}" for b in batches)
          + "):")
    selected: dict[str, Callable] = {}
    if "torch" in runtimes:
        selected["torch"] = TorchRuntime(graph) if device.type == "cpu" else _DeviceRuntime(graph, device)
    with tempfile.TemporaryDirectory() as tmp:
        if {"onnx", "int8"} & set(runtimes):
            with warnings.catch_warnings():  # the tracer's and the quantizer's advice, not results
                warnings.simplefilter("ignore")
                logging.disable(logging.WARNING)
                fp32_path = export_onnx(graph.cpu(), Path(tmp) / "fp32.onnx", size, {})
                # static int8 (the recommended recipe), its ranges calibrated on random inputs: speed only
                calibration = np.random.default_rng(1).standard_normal((2, 3, *size), dtype=np.float32)
                int8_path = (quantize_int8(fp32_path, Path(tmp) / "int8.onnx", "static", [(calibration, full_boxes(
                    calibration))]) if "int8" in runtimes else None)
                logging.disable(logging.NOTSET)
            graph.to(device)
            selected["onnx fp32"] = OnnxRuntime(fp32_path, args.threads)
            if int8_path:
                selected["onnx int8"] = OnnxRuntime(int8_path, args.threads)
            if "onnx" not in runtimes:
                del selected["onnx fp32"]
        benchmark_inference(selected, config, flops, gemm, batches, repeats, device)
    if args.data and "torch" in selected:
        benchmark_with_decoding(selected["torch"], args.data, config, flops, gemm, batches[-1], repeats[batches[-1]])
    if device.type == "cuda":
        print(f"peak GPU memory, inference: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB", flush=True)
        torch.cuda.reset_peak_memory_stats(device)

    if not args.no_training:
        steps = 3 if args.quick else 10
        if args.data:
            samples = load_mvtec(args.data, "train")[: 2 * config.batch_size]
            dataset: Dataset = ImageDataset(samples, INPFormer.from_config(config).preprocess)
        else:
            dataset = _RandomImages(2 * config.batch_size, size)
        images = "real" if args.data else "random"
        print(f"training (batch {config.batch_size}, {len(dataset)} {images} images, median of {steps} steps "
              "after the first):")
        for cache in (True, False):
            per_step, cache_seconds = training_seconds_per_step(net, dataset, config, cache, steps)
            extra = f" (+ one-off cache of {len(dataset)} images: {cache_seconds:.1f} s)" if cache else ""
            print(f"  {'with' if cache else 'without'} feature cache: {per_step:.3f} s/step{extra}", flush=True)
        if device.type == "cuda":
            print(f"peak GPU memory, training: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print(TARGETS)


if __name__ == "__main__":
    main()
