"""The paper's protocol: the `paper` preset fits every good image, thresholds record their source, fp32 training
unless bf16 is asked for."""

import pytest
from synthetic import make_mvtec, tiny_cli

from inpformer import INPFormer, load_mvtec, make_config
from inpformer.cli import main
from inpformer.errors import InpformerError

TINY = {"backbone": "tiny_random", "image_size": 64, "crop_size": 56, "iterations": 6, "batch_size": 4,
        "warmup_iterations": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_mvtec(tmp_path_factory.mktemp("data"), categories=("plate",), n_train=10, n_good_test=3,
                      defect_types={"spot": 2})


def test_the_paper_preset_fits_every_good_image():
    paper = make_config("paper")
    assert paper.val_fraction == 0 and paper.precision == "fp32"
    assert (paper.backbone, paper.image_size, paper.crop_size, paper.batch_size, paper.epochs) == (
        "dinov2reg_vitb14", 448, 392, 16, 200)
    assert make_config("cpu").val_fraction == 0.1


def test_thresholds_record_the_images_that_set_them(data, tmp_path):
    train = load_mvtec(data, "train")
    all_fitted = INPFormer(preset="cpu", val_fraction=0.0, **TINY).fit(train, progress=False)
    assert all_fitted.calibration.thresholds[""].num_good == 10  # every image fitted, and scored for thresholds
    assert "fitted on" in all_fitted.calibration.source and "biased low" in all_fitted.calibration.source
    held_out = INPFormer(preset="cpu", val_fraction=0.2, **TINY).fit(train, progress=False)
    assert held_out.calibration.thresholds[""].num_good == 2
    assert held_out.calibration.source.startswith("2 good training images held out")
    reloaded = INPFormer.load(held_out.save(tmp_path / "m.pt"))
    assert reloaded.calibration.source == held_out.calibration.source
    assert reloaded.metadata()["calibration"]["source"] == held_out.calibration.source


def test_calibrate_on_other_images_records_them(data, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), *tiny_cli(6, warmup=2), "--val-fraction", "0"]) == 0
    assert main(["calibrate", str(run), "--data", str(data), "--method", "f1", "--quiet"]) == 0
    source = INPFormer.load(run / "models" / "plate.pt").calibration.source
    assert source == f"3 good and 2 defective test images of {data}"


def test_precision_is_fp32_unless_bf16_is_asked_for(data):
    train = load_mvtec(data, "train")
    losses = {precision: INPFormer(preset="cpu", precision=precision, **TINY).fit(train, progress=False)
              .training_log.losses for precision in ("fp32", "bf16")}
    assert losses["fp32"] != losses["bf16"]  # bf16 autocast is in effect (on any device), fp32 is not
    default = INPFormer(preset="cpu", **TINY).fit(train, progress=False).training_log.losses
    assert default == losses["fp32"]
    with pytest.raises(InpformerError, match="--precision must be one of fp32, bf16"):
        make_config("cpu", precision="fp16")
