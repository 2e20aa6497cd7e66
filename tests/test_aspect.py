"""Non-square inputs and aspect-preserving padding, end to end: train, test, predict, ONNX."""

import json
import logging

import numpy as np
import pytest
import torch
from synthetic import add_defect, save_image, textured_image, tiny_cli

from inpformer import INPFormer, load_mvtec, training
from inpformer.cli import main
from inpformer.scoring import valid_pixels

TINY = tiny_cli(20, image_size=None, crop_size=None)


def _tall(image: np.ndarray, width: int) -> np.ndarray:
    return image[:, :width]


@pytest.fixture(scope="module")
def tall_dataset(tmp_path_factory):
    """Images of 64 x 24 to 64 x 40 pixels (tall, varying aspect ratios), MVTec layout."""
    root = tmp_path_factory.mktemp("tall") / "strip"
    rng = np.random.default_rng(0)
    for i in range(8):
        save_image(root / "train" / "good" / f"{i:03d}.png", _tall(textured_image(rng, 64), 24 + 2 * i))
    for i in range(3):
        save_image(root / "test" / "good" / f"{i:03d}.png", _tall(textured_image(rng, 64), 30))
        image, mask = add_defect(rng, textured_image(rng, 64))
        mask[:, 32:] = False
        mask[20:30, 10:20] = True  # inside the kept part
        save_image(root / "test" / "hole" / f"{i:03d}.png", _tall(image, 32))
        save_image(root / "ground_truth" / "hole" / f"{i:03d}_mask.png", _tall(mask.astype(np.uint8) * 255, 32))
    return root


@pytest.mark.slow
def test_padding_never_counts_in_maps_scores_or_metrics(tall_dataset, tmp_path, caplog):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tall_dataset), "--image-size", "56x42", "--resize-mode", "pad",
                 "--out", str(run), *TINY]) == 0
    detector = INPFormer.load(run / "models" / "strip.pt")
    assert detector.config.image_size == (56, 42) and detector.config.resize_mode == "pad"
    samples = load_mvtec(tall_dataset, "test")
    scored = detector.score(samples, with_masks=True)
    assert scored.maps.shape == (6, 341, 256)
    dataset_boxes = torch.stack([detector.preprocess.valid_box((64, 30 if s.label == 0 else 32)) for s in samples])
    valid = valid_pixels(dataset_boxes, (341, 256)).numpy()
    assert not valid.all() and valid.any(axis=(1, 2)).all()
    assert np.abs(scored.maps[~valid]).max() == 0 and scored.maps[valid].max() > 0
    for score, image_map, inside in zip(scored.scores, scored.maps.astype(np.float32), valid, strict=True):
        own = np.sort(image_map[inside])[::-1][: int(inside.sum() * 0.01)]  # the top 1 % of the image's pixels
        assert score == pytest.approx(own.mean(), rel=2e-3)

    assert main(["test", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())["categories"]["strip"]
    assert all(value is not None for value in metrics.values())

    out = tmp_path / "predict"
    image = tall_dataset / "test" / "hole" / "000.png"
    assert main(["predict", str(run), str(image), "--out", str(out), "--quiet"]) == 0
    prediction = detector.predict(image)
    assert prediction.anomaly_map.shape == (64, 32) and prediction.mask.shape == (64, 32)
    onnx_file = tmp_path / "strip.onnx"
    assert main(["export", str(run), "--onnx", str(onnx_file)]) == 0
    assert main(["predict", str(onnx_file), str(image), "--out", str(tmp_path / "onnx"), "--runtime", "onnx",
                 "--quiet"]) == 0
    rows = [json.loads((folder / "predictions.json").read_text())["predictions"][0]
            for folder in (out, tmp_path / "onnx")]
    assert rows[0]["score"] == pytest.approx(rows[1]["score"], abs=1e-4)
    assert rows[0]["decision"] == rows[1]["decision"]

    # a padded model saved before scores left the padding out: its thresholds are flagged as stale at loading
    old = torch.load(run / "models" / "strip.pt", weights_only=True) | {"format_version": 1}
    torch.save(old, tmp_path / "old.pt")
    logger = logging.getLogger("inpformer")  # the CLI's logging stops its records at this logger
    logger.addHandler(caplog.handler)
    try:
        INPFormer.load(tmp_path / "old.pt")
    finally:
        logger.removeHandler(caplog.handler)
    assert "old.pt: its thresholds were set when a padded image's score was taken over the whole input" in caplog.text


@pytest.mark.slow
def test_non_square_stretch_and_token_subsets_from_the_cli(tall_dataset, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tall_dataset), "--image-size", "56x28", "--train-tokens", "4",
                 "--out", str(run), *TINY]) == 0
    detector = INPFormer.load(run / "models" / "strip.pt")
    assert detector.config.train_tokens == 4 and detector.config.crop_size == (56, 28)
    prediction = detector.predict(tall_dataset / "test" / "good" / "000.png")
    assert prediction.anomaly_map.shape == (64, 30)

    # padded, the subsets are drawn from each image's own tokens: of the 4 x 3 token grid, the narrow images fill
    # the middle column (4 tokens), the wide ones all 12
    drawn = []
    draw = training._TokenSubsets.__call__

    def spy(self, num_tokens, valid=None):
        drawn.append((valid, draw(self, num_tokens, valid)))
        return drawn[-1][1]

    monkeypatch.setattr(training._TokenSubsets, "__call__", spy)
    assert main(["train", "--data", str(tall_dataset), "--image-size", "56x42", "--resize-mode", "pad",
                 "--train-tokens", "4", "--out", str(tmp_path / "padded"), *TINY]) == 0
    assert len(drawn) == 20 and any(not valid.all() for valid, _ in drawn)
    assert all(valid.gather(1, subset).all() for valid, subset in drawn)  # every image has 4 valid tokens or more
    assert main(["train", "--data", str(tall_dataset), "--image-size", "56x30", "--out", str(tmp_path / "bad"),
                 *TINY]) == 2
    assert main(["train", "--data", str(tall_dataset), "--train-tokens", "0", "--out", str(tmp_path / "bad"),
                 *TINY]) == 2
