"""Training on a device, the feature cache (memory, disk, off) and data-parallel processes (gloo on the CPU)."""

import dataclasses
import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from synthetic import make_mvtec
from test_model import TinyDataset, make_net

from inpformer import distributed, training
from inpformer.cli import main
from inpformer.config import config_from_dict, make_config
from inpformer.errors import InpformerError

CONFIG = make_config("cpu", iterations=5, batch_size=5, warmup_iterations=2, device="cpu")


def _train(dataset, **settings):
    net = make_net(seed=3)
    losses = training.train(net, dataset, dataclasses.replace(CONFIG, **settings), progress=False).losses
    return losses, {k: v.clone() for k, v in net.state_dict().items()}


def test_memory_disk_and_uncached_training_agree(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("INPFORMER_CACHE", str(tmp_path))
    caplog.set_level(logging.INFO, logger="inpformer")
    dataset = TinyDataset(7)
    memory, memory_weights = _train(dataset, feature_cache_storage="memory")
    disk, disk_weights = _train(dataset, feature_cache_storage="disk")
    uncached, _ = _train(dataset, feature_cache=False)
    assert memory == disk  # the same float32 features, read from a file
    assert all(torch.equal(memory_weights[k], disk_weights[k]) for k in memory_weights)
    np.testing.assert_allclose(memory, uncached, rtol=1e-5)
    assert "memory-mapped in" in caplog.text and "in memory" in caplog.text
    assert not any((tmp_path / "features").iterdir())  # the file is gone once mapped


def test_auto_storage_uses_disk_when_memory_is_short(tmp_path, monkeypatch):
    monkeypatch.setenv("INPFORMER_CACHE", str(tmp_path))
    net, dataset = make_net(), TinyDataset(3)
    expected = net.encode(torch.stack([dataset[i]["image"] for i in range(3)]))
    monkeypatch.setattr(training, "available_memory", lambda: 10**9)
    in_memory = training.encode_dataset(net, dataset, storage="auto", progress=False)
    monkeypatch.setattr(training, "available_memory", lambda: 1000)
    on_disk = training.encode_dataset(net, dataset, storage="auto", progress=False)
    torch.testing.assert_close(in_memory, expected)
    torch.testing.assert_close(on_disk, expected)
    assert on_disk.untyped_storage().filename is not None and in_memory.untyped_storage().filename is None


def test_disk_cache_without_room_and_unknown_settings_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("INPFORMER_CACHE", str(tmp_path))
    monkeypatch.setattr("shutil.disk_usage", lambda path: SimpleNamespace(free=10))
    with pytest.raises(InpformerError, match=r"feature cache needs .* INPFORMER_CACHE"):
        training.encode_dataset(make_net(), TinyDataset(3), storage="disk", progress=False)
    with pytest.raises(InpformerError, match="feature cache storage 'ram'"):
        training.encode_dataset(make_net(), TinyDataset(3), storage="ram", progress=False)
    with pytest.raises(InpformerError, match="unknown device 'gpu'"):
        distributed.setup("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(InpformerError, match="--device cuda: no CUDA GPU"):
            distributed.setup("cuda")


def test_configs_of_older_versions_still_load():
    old = {k: v for k, v in CONFIG.to_dict().items() if k not in ("feature_cache_storage", "device", "compile")}
    config = config_from_dict({**old, "feature_cache": False})
    assert config.feature_cache is False and config.device == "auto" and config.feature_cache_storage == "auto"


CACHES = {"memory": {"feature_cache_storage": "memory"}, "disk": {"feature_cache_storage": "disk"},
          "off": {"feature_cache": False}}


def _train_in_process(result_file):
    """One rank of the data-parallel test: the same tiny model trained from each kind of feature cache."""
    dataset = TinyDataset(33)  # uneven shards: 17 and 16 images, so one rank encodes an empty last batch
    results = {name: _train(dataset, **settings) for name, settings in CACHES.items()}
    if distributed.is_main_process():
        torch.save(results, result_file)


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("INPFORMER_CACHE", str(tmp_path))
    assert distributed.spawn(_train_in_process, 2, tmp_path / "two.pt") == 0
    two = torch.load(tmp_path / "two.pt")
    dataset = TinyDataset(33)
    for name, settings in CACHES.items():
        losses, weights = _train(dataset, **settings)  # batch 5: shares of 3 and 2 images in two processes
        np.testing.assert_allclose(two[name][0], losses, rtol=1e-5, atol=1e-6)
        for key, value in weights.items():
            torch.testing.assert_close(two[name][1][key], value, rtol=1e-5, atol=1e-6)
    assert not any((tmp_path / "features").iterdir())


@pytest.mark.slow
def test_cli_trains_with_two_local_processes(tmp_path):
    data = make_mvtec(tmp_path / "data", categories=("bolt",), n_train=6, n_good_test=1, defect_types={"crack": 1})
    run = tmp_path / "run"
    argv = ["train", "--data", str(data), "--out", str(run), "--backbone", "tiny_random", "--image-size", "56",
            "--crop-size", "56", "--iterations", "3", "--batch-size", "4", "--warmup-iterations", "1",
            "--device", "cpu", "--devices", "2", "--quiet"]
    assert main(argv) == 0
    assert json.loads((run / "run.json").read_text())["models"]["bolt"]["file"] == "models/bolt.pt"
    assert sorted(p.name for p in (run / "models").iterdir()) == ["bolt.pt"]
