import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image
from synthetic import make_folder, make_mvtec, make_realiad, make_visa_1cls, make_visa_raw, save_image

from inpformer.data.datasets import (
    DATASET_KINDS,
    dataset_categories,
    detect_dataset,
    load_dataset,
    load_folder,
    load_realiad,
    load_visa,
)
from inpformer.data.images import ImageDataset, Preprocess, load_mvtec, read_mask
from inpformer.errors import InpformerError


def _error(call, *needles):
    """Run ``call``, expecting a one-line InpformerError that mentions every needle."""
    with pytest.raises(InpformerError) as excinfo:
        call()
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert str(needle) in message, message
    return message


def _masks(samples):
    """Masks as ImageDataset delivers them (no resizing: 64 px images, 64 px crop)."""
    dataset = ImageDataset(samples, Preprocess(64, 64), with_masks=True)
    return [dataset[i]["mask"].numpy().astype(bool) for i in range(len(dataset))]


def test_read_mask_nonzero(tmp_path):
    Image.fromarray(np.array([[0, 1, 2, 3, 200]], dtype=np.uint8)).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png", nonzero=True).tolist() == [[False, True, True, True, True]]
    assert read_mask(tmp_path / "m.png").tolist() == [[False, False, False, False, True]]  # half-range rule


# ----------------------------------------------------------------------------------------------------
# VisA


def test_load_visa_raw(tmp_path):
    root = make_visa_raw(tmp_path / "visa", categories=("pcb1", "candle"), n_normal=5, n_anomaly=3, n_test_normal=2)
    train = load_visa(root, "train")
    assert [(s.category, s.path.name) for s in train[:4]] == [
        ("candle", "0000.JPG"), ("candle", "0001.JPG"), ("candle", "0002.JPG"), ("pcb1", "0000.JPG"),
    ]  # fmt: skip
    assert len(train) == 6 and all(s.label == 0 and s.defect_type == "good" and s.mask_path is None for s in train)
    assert all(s.dataset == "visa" and s.mask_nonzero for s in train)

    test = load_visa(root, "test", categories=["pcb1"])
    assert [(s.path.name, s.label, s.defect_type) for s in test] == [
        ("0003.JPG", 0, "good"), ("0004.JPG", 0, "good"),
        ("000.JPG", 1, "anomaly"), ("001.JPG", 1, "anomaly"), ("002.JPG", 1, "anomaly"),
    ]  # fmt: skip
    assert test[2].mask_path == root / "pcb1" / "Data" / "Masks" / "Anomaly" / "000.png"
    assert test == load_visa(root, "test", categories=["pcb1"])  # deterministic


def test_visa_masks_use_nonzero_values(tmp_path):
    root = make_visa_raw(tmp_path, n_normal=3, n_anomaly=3, n_test_normal=1)
    anomalies = [s for s in load_visa(root, "test") if s.label == 1]
    values = [set(np.unique(np.asarray(Image.open(s.mask_path)))) for s in anomalies]
    assert values == [{0, 1}, {0, 2}, {0, 3}]
    for sample, mask in zip(anomalies, _masks(anomalies), strict=True):
        assert mask.any()
        assert np.array_equal(mask, np.asarray(Image.open(sample.mask_path)) > 0)


def test_load_visa_category_folder(tmp_path):
    root = make_visa_raw(tmp_path, categories=("candle", "fryum"), n_normal=4, n_anomaly=1)
    test = load_visa(root / "fryum", "test")
    assert {s.category for s in test} == {"fryum"} and len(test) == 3
    assert dataset_categories(root / "fryum", "visa") == ["fryum"]


def test_visa_errors(tmp_path):
    root = make_visa_raw(tmp_path / "visa", n_normal=3, n_anomaly=2)
    _error(lambda: load_visa(root, "test", ["capsules"]), "unknown category capsules", "available: candle")
    _error(lambda: load_visa(root, "val"), "unknown split")

    mask = root / "candle" / "Data" / "Masks" / "Anomaly" / "001.png"
    mask.unlink()
    _error(lambda: load_visa(root, "test"), mask, "1cls.csv")
    assert len(load_visa(root, "train")) == 1  # the train split has no masks to miss

    csv_path = root / "split_csv" / "1cls.csv"
    csv_path.write_text(csv_path.read_text().replace("candle/Data/Masks/Anomaly/001.png", ""))
    _error(lambda: load_visa(root, "test"), csv_path, "Anomaly/001.JPG has no mask")

    csv_path.write_text("object,split,image\ncandle,train,x.JPG\n")
    _error(lambda: load_visa(root, "train"), csv_path, "label, mask")

    csv_path.unlink()
    assert detect_dataset(root) == "visa"  # the image folders still identify the release
    _error(lambda: load_visa(root, "train"), csv_path, "not found")


def test_visa_1cls_is_mvtec_layout(tmp_path):
    root = make_visa_1cls(tmp_path / "1cls", categories=("candle", "pcb1"), n_train=3, n_good_test=2, n_defect=3)
    assert detect_dataset(root) == "mvtec"
    test = load_mvtec(root, "test", ["candle"])
    assert [s.defect_type for s in test] == ["bad"] * 3 + ["good"] * 2
    assert test[0].mask_path == root / "candle" / "ground_truth" / "bad" / "000.png"
    assert not any(s.mask_nonzero for s in test)
    # masks valued 2 and 3 are lost by the half-range rule, kept by the non-zero one
    assert [m.any() for m in _masks(test[:3])] == [True, False, False]
    nonzero = load_mvtec(root, "test", ["candle"], mask_nonzero=True)
    assert all(s.mask_nonzero for s in nonzero) and all(m.any() for m in _masks(nonzero[:3]))

    as_visa = load_visa(root, "test", ["candle"])
    assert [s.path for s in as_visa] == [s.path for s in test]
    assert all(s.dataset == "visa" and s.mask_nonzero for s in as_visa)
    assert dataset_categories(root, "visa") == ["candle", "pcb1"]


# ----------------------------------------------------------------------------------------------------
# Real-IAD


def test_load_realiad(tmp_path):
    root = make_realiad(tmp_path / "Real-IAD", categories=("usb", "audiojack"), n_train=4, n_good_test=2, n_defect=3)
    train = load_realiad(root, "train")
    assert [s.category for s in train] == ["audiojack"] * 4 + ["usb"] * 4
    assert all(s.label == 0 and s.defect_type == "good" and s.dataset == "realiad" for s in train)
    assert train[0].path == root / "realiad_1024/audiojack/OK/S0000/audiojack_0000_OK_C1_20240101000000.jpg"

    test = load_realiad(root, "test", categories="usb")
    assert [(s.label, s.defect_type) for s in test] == [(0, "good")] * 2 + [(1, "AK"), (1, "AK"), (1, "HS")]
    defects = test[2:]
    assert all(s.mask_path == s.path.with_suffix(".png") and s.mask_nonzero for s in defects)
    for sample, mask in zip(defects, _masks(defects), strict=True):
        assert np.array_equal(mask, np.asarray(Image.open(sample.mask_path)) > 0) and mask.any()
    assert test == load_realiad(root, "test", categories="usb")


def test_realiad_layout_variants(tmp_path):
    root = make_realiad(tmp_path / "Real-IAD", n_train=2, n_good_test=1, n_defect=1)
    expected = [s.path.relative_to(root / "realiad_1024") for s in load_realiad(root, "test")]

    images = root / "realiad_1024"
    assert detect_dataset(images) == "realiad"  # the image folder itself, jsons beside it
    assert [s.path.relative_to(images) for s in load_dataset(images, "test")] == expected

    images = images.rename(root / "realiad_256")
    jsons = root / "realiad_jsons"
    for file in (jsons / "realiad_jsons").glob("*.json"):  # flat jsons folder
        file.rename(jsons / file.name)
    assert [s.path.relative_to(images) for s in load_realiad(root, "test")] == expected
    assert dataset_categories(root) == ["audiojack"]


def test_realiad_single_view_jsons(tmp_path):
    root = make_realiad(tmp_path, n_train=3, n_good_test=2, n_defect=2, json_dir="realiad_jsons_sv")
    _error(lambda: load_realiad(root, "test"), "realiad_jsons", "found realiad_jsons_sv", "json_dir")
    assert len(load_realiad(root, "test", json_dir="realiad_jsons_sv")) == 4
    assert len(load_dataset(root, "train", json_dir="realiad_jsons_sv")) == 3

    make_realiad(root, n_train=3, n_good_test=2, n_defect=2)  # the multi-view jsons as well
    sv = root / "realiad_jsons_sv" / "realiad_jsons_sv" / "audiojack.json"
    content = json.loads(sv.read_text())
    content["test"] = content["test"][:1] + content["test"][-1:]
    sv.write_text(json.dumps(content))
    assert len(load_realiad(root, "test")) == 4
    assert [s.label for s in load_realiad(root, "test", json_dir="realiad_jsons_sv")] == [0, 1]


def test_realiad_errors(tmp_path):
    root = make_realiad(tmp_path, categories=("audiojack", "pcb"), n_train=2, n_good_test=1, n_defect=2)
    _error(lambda: load_realiad(root, "test", ["toy"]), "unknown category toy", "available: audiojack, pcb")
    shutil.rmtree(root / "realiad_1024" / "pcb")
    _error(lambda: load_realiad(root, "test", ["pcb"]), root / "realiad_1024" / "pcb", "not found")
    assert dataset_categories(root, "realiad") == ["audiojack"]

    json_path = root / "realiad_jsons" / "realiad_jsons" / "audiojack.json"
    content = json.loads(json_path.read_text())
    defect = content["test"][-1]
    mask = root / "realiad_1024" / "audiojack" / defect["mask_path"]
    mask.unlink()
    _error(lambda: load_realiad(root, "test"), defect["image_path"], "without mask file", json_path)
    assert len(load_realiad(root, "train")) == 2

    defect["mask_path"] = None
    json_path.write_text(json.dumps(content))
    _error(lambda: load_realiad(root, "test"), defect["image_path"], "mask_path None")

    json_path.write_text("{not json")
    _error(lambda: load_realiad(root, "train"), json_path, "cannot read")


# ----------------------------------------------------------------------------------------------------
# plain folders


def test_load_folder(tmp_path):
    folders = make_folder(tmp_path / "parts", n_good=4, n_test_good=2, n_defect=3)
    (folders["good"] / "nested").mkdir()  # subfolders are not read
    save_image(folders["good"] / "nested" / "x.png", np.zeros((8, 8, 3), np.uint8))
    (folders["good"] / "notes.txt").write_text("x")
    train, test = load_folder(folders["good"], folders["test_good"], folders["test_defective"], folders["masks"])
    assert [s.path.name for s in train] == ["000.png", "001.png", "002.png", "003.png"]
    assert {(s.category, s.dataset) for s in train + test} == {("parts", "folder")}  # "good" is generic
    assert [(s.label, s.defect_type) for s in test] == [(0, "good")] * 2 + [(1, "defective")] * 3
    assert [s.mask_path.name for s in test[2:]] == ["000.png", "001_mask.png", "002_mask.bmp"]
    assert all(m.any() for m in _masks(test[2:]))


def test_load_folder_optional_parts(tmp_path, caplog):
    folders = make_folder(tmp_path, n_good=3, n_test_good=1, n_defect=3)
    train, test = load_folder(folders["good"], category="screws")
    assert len(train) == 3 and test == [] and train[0].category == "screws"

    _, test = load_folder(folders["good"], test_defective=folders["test_defective"])
    assert [s.mask_path for s in test] == [None] * 3

    (folders["masks"] / "000.png").unlink()
    with caplog.at_level(logging.WARNING, logger="inpformer"):
        _, test = load_folder(folders["good"], test_defective=folders["test_defective"], masks=folders["masks"])
    assert [s.mask_path is None for s in test] == [True, False, False]
    assert "no mask for 1 of 3 defective images" in caplog.text


def test_load_folder_errors(tmp_path):
    folders = make_folder(tmp_path, n_good=2, n_test_good=1, n_defect=1)
    _error(lambda: load_folder(tmp_path / "absent"), tmp_path / "absent", "not found")
    (tmp_path / "empty").mkdir()
    _error(lambda: load_folder(tmp_path / "empty"), tmp_path / "empty", "no good training images")
    _error(lambda: load_folder(folders["good"], masks=folders["masks"]), folders["masks"], "without a folder")
    defective = folders["test_defective"]
    _error(lambda: load_folder(folders["good"], test_defective=defective, masks=defective), "own")


# ----------------------------------------------------------------------------------------------------
# detection and dispatch


LAYOUTS = {
    "mvtec": (lambda root: make_mvtec(root, ("bolt", "tile"), n_train=2, n_good_test=1),
              "MVTec AD layout (2 categories)"),
    "visa": (lambda root: make_visa_raw(root, ("candle", "pcb1"), n_normal=3, n_anomaly=1),
             "VisA (raw release, 2 categories)"),
    "realiad": (lambda root: make_realiad(root, ("pcb", "usb"), n_train=2, n_good_test=1, n_defect=1),
                "Real-IAD (realiad_1024, realiad_jsons/realiad_jsons, 2 categories)"),
}


@pytest.mark.parametrize("kind", LAYOUTS)
def test_detect_and_load_dataset(tmp_path, caplog, kind):
    make, message = LAYOUTS[kind]
    root = make(tmp_path / "data")
    assert detect_dataset(root) == kind
    with caplog.at_level(logging.INFO, logger="inpformer"):
        test = load_dataset(root, "test")
    assert f"{root}: {message}" in caplog.text
    assert {s.dataset for s in test} == {kind} and {s.label for s in test} == {0, 1}
    assert test == load_dataset(root, "test", kind=kind)
    assert dataset_categories(root) == dataset_categories(root, kind) == sorted({s.category for s in test})
    assert {s.category for s in load_dataset(root, "train", categories=[test[-1].category])} == {test[-1].category}
    _error(lambda: load_dataset(root, "test", ["nope"]), "unknown category nope")


def test_unknown_layout_and_kind(tmp_path):
    save_image(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "photos").mkdir()
    _error(lambda: detect_dataset(tmp_path), tmp_path, "unknown dataset layout", "folders photos, 1 images",
           "MVTec AD", "VisA", "Real-IAD", "folder")
    _error(lambda: load_dataset(tmp_path, "train"), "unknown dataset layout")
    _error(lambda: detect_dataset(tmp_path / "absent"), tmp_path / "absent", "not found")
    _error(lambda: load_dataset(tmp_path, "train", kind="folder"), "load_folder")
    _error(lambda: load_dataset(tmp_path, "train", kind="kolektor"), "kolektor", ", ".join(DATASET_KINDS))
