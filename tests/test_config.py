"""Presets are data; every option can be overridden; bad values get one-line errors."""

import pytest

from inpformer.config import PRESETS, config_from_dict, make_config
from inpformer.errors import InpformerError
from inpformer.training import total_iterations


def test_paper_preset_is_the_papers_configuration():
    config = make_config("paper")
    assert (config.backbone, config.image_size, config.crop_size, config.batch_size) == (
        "dinov2reg_vitb14", 448, 392, 16)
    assert (config.lr, config.final_lr, config.warmup_iterations) == (1e-3, 1e-4, 100)
    assert (config.weight_decay, config.grad_clip, config.num_inps, config.coherence_weight) == (1e-4, 0.1, 6, 0.2)
    assert total_iterations(config, num_images=320) == 200 * 20  # 200 epochs of full batches


def test_cpu_preset_and_overrides():
    config = make_config("cpu", iterations=7, seed=5, backbone_weights=None)
    assert config.backbone == "dinov2_vits14" and config.iterations == 7 and config.seed == 5
    assert (config.image_size, config.crop_size, config.resize_mode, config.train_tokens) == (448, 448, "pad", 128)
    assert config.deployment_geometry() == config.geometry()  # no crop: what is tested is what is deployed
    assert total_iterations(make_config("cpu", epochs=3), num_images=80) == 30  # --epochs replaces iterations
    assert total_iterations(make_config("paper", iterations=9), num_images=80) == 9
    assert config_from_dict({**config.to_dict(), "from_a_newer_version": 1}) == config
    assert set(PRESETS) == {"paper", "cpu"}
    paper = make_config("paper")
    assert (paper.resize_mode, paper.train_tokens) == ("stretch", None)  # the paper: every token, stretched
    assert paper.deployment_geometry().crop_size == (448, 448) and paper.geometry().crop_size == (392, 392)
    assert make_config("cpu", image_size="448x336").crop_size == (448, 336)


@pytest.mark.parametrize(
    ("preset", "overrides", "message"),
    [
        ("gpu", {}, "unknown preset"),
        ("cpu", {"crop_size": 230, "image_size": 256}, "multiple of the patch size"),
        ("cpu", {"crop_size": 252, "image_size": 224}, "does not fit in --image-size"),
        ("cpu", {"batch_size": 0}, "--batch-size"),
        ("cpu", {"learning_rate": 1.0}, "unknown setting"),
        ("cpu", {"tile_scale": 0.5, "image_size": 224, "crop_size": 196}, "--tile-scale cuts tiles"),
        ("cpu", {"tile_scale": 0.0}, "--tile-scale 0.0"),
        ("cpu", {"train_tokens": 0}, "--train-tokens must be a count"),
        ("cpu", {"image_size": "448x"}, "--image-size"),
        ("cpu", {"resize_mode": "zoom"}, "--resize-mode"),
    ],
)
def test_invalid_settings(preset, overrides, message):
    with pytest.raises(InpformerError, match=message):
        make_config(preset, **overrides)
