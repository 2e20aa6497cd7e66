"""The CUDA paths: training with and without torch.compile, fp32 and bf16, DDP over NCCL, the disk feature cache with
pinned memory, and predict / export from a CUDA-trained model. Skipped without a GPU; run on one by
`benchmarks/gpu_check.sh`."""

import dataclasses
import os

import numpy as np
import pytest
import torch
from synthetic import make_mvtec
from test_model import TinyDataset, make_net

from inpformer import INPFormer, distributed, load_mvtec, training
from inpformer.config import make_config
from inpformer.export import OnnxRuntime, export_onnx

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CONFIG = make_config("cpu", iterations=8, batch_size=4, warmup_iterations=2, train_tokens="all", device="cuda")
TINY = {"backbone": "tiny_random", "image_size": 64, "crop_size": 56, "iterations": 20, "batch_size": 4,
        "warmup_iterations": 5, "device": "cuda"}


def _losses(**settings) -> list[float]:
    return training.train(make_net(seed=3), TinyDataset(12), dataclasses.replace(CONFIG, **settings),
                          progress=False).losses


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_on_cuda_matches_the_cpu(compile, precision):
    cpu = training.train(make_net(seed=3), TinyDataset(12), dataclasses.replace(CONFIG, device="cpu"),
                         progress=False).losses
    cuda = _losses(compile=compile, precision=precision)
    assert all(np.isfinite(cuda))
    tolerance = 1e-3 if precision == "fp32" else 5e-2  # TF32-free fp32 kernels differ in summation order only
    np.testing.assert_allclose(cuda, cpu, rtol=tolerance)


def test_ddp_over_nccl_in_a_group_of_one(monkeypatch):
    single = _losses()
    monkeypatch.setitem(os.environ, "MASTER_ADDR", "127.0.0.1")
    monkeypatch.setitem(os.environ, "MASTER_PORT", str(distributed._free_port()))
    torch.distributed.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        grouped = _losses()
    finally:
        torch.distributed.destroy_process_group()
    np.testing.assert_allclose(grouped, single, rtol=1e-5)


def test_disk_feature_cache_on_cuda(tmp_path, monkeypatch):
    monkeypatch.setenv("INPFORMER_CACHE", str(tmp_path))
    np.testing.assert_allclose(_losses(feature_cache_storage="disk"), _losses(feature_cache_storage="memory"),
                               rtol=1e-6)


def test_a_cuda_trained_model_predicts_and_exports_on_the_cpu(tmp_path):
    data = make_mvtec(tmp_path / "data", categories=("plate",), n_train=8, n_good_test=2, defect_types={"spot": 2})
    detector = INPFormer(preset="cpu", **TINY).fit(load_mvtec(data, "train"), progress=False)
    assert all(p.device.type == "cpu" for p in detector.net.parameters())
    loaded = INPFormer.load(detector.save(tmp_path / "m.pt"))
    test = load_mvtec(data, "test")
    predictions = loaded.predict([s.path for s in test])
    assert [p.score for p in predictions] == pytest.approx([p.score for p in detector.predict([s.path for s in test])])
    graph = loaded.inference_graph(deployment=True)
    size = loaded.config.deployment_geometry().crop_size
    onnx = OnnxRuntime(export_onnx(graph, tmp_path / "m.onnx", size, loaded.metadata()))
    images = torch.stack([loaded.deployment_preprocess(np.zeros((64, 64, 3), np.uint8))]).numpy()
    torch_scores = graph(torch.from_numpy(images), torch.tensor([[0.0, 0.0, 1.0, 1.0]]))[1].detach().numpy()
    np.testing.assert_allclose(onnx(images).scores, torch_scores, rtol=1e-4)
