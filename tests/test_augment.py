"""Few-shot expansion (x22) and shot drawing."""

import numpy as np
import torch
from synthetic import make_mvtec

from inpformer.data.augment import FEW_SHOT_EXPANSIONS, ExpandedDataset, draw_shots
from inpformer.data.images import Preprocess, load_mvtec


def test_22_distinct_expansions_in_pixel_space():
    torch.manual_seed(0)
    image = torch.randint(1, 256, (3, 40, 40), dtype=torch.uint8)  # no zero pixels: padding is detectable
    outputs = [f(image) for f in FEW_SHOT_EXPANSIONS]
    assert len(outputs) == 22
    assert all(o.shape == image.shape and o.dtype == torch.uint8 for o in outputs)
    assert torch.equal(outputs[0], image)
    assert len({o.numpy().tobytes() for o in outputs}) == 22
    # rotations by pi/16..pi/4 and translations pad with black; flips and quarter turns do not
    assert all((o == 0).all(dim=0).any() for o in outputs[1:17])
    assert torch.equal(outputs[17], image.flip(-1))
    assert torch.equal(outputs[18][0], outputs[18][1]) and torch.equal(outputs[18][1], outputs[18][2])
    assert torch.equal(outputs[19], torch.rot90(image, 1, (1, 2)))
    assert torch.equal(outputs[21], torch.rot90(image, 3, (1, 2)))
    # translation by (+0.1, +0.1) of the size moves content right and down by 4 pixels
    translated = outputs[9]
    assert torch.equal(translated[:, 4:, 4:], image[:, :-4, :-4])
    assert (translated[:, :4, :] == 0).all()


def test_expanded_dataset(tmp_path):
    root = make_mvtec(tmp_path, n_train=3)
    samples = load_mvtec(root, "train")
    preprocess = Preprocess(64, 56)
    dataset = ExpandedDataset(samples, preprocess)
    assert len(dataset) == 3 * 22
    item = dataset[22]  # second image, original
    from inpformer.data.images import read_image

    torch.testing.assert_close(item["image"], preprocess(read_image(samples[1].path)))
    assert item["index"] == 22 and dataset[23]["image"].shape == (3, 56, 56)


def test_draw_shots_is_per_category_and_seeded(tmp_path):
    root = make_mvtec(tmp_path, categories=("a", "b"), n_train=8)
    samples = load_mvtec(root, "train")
    drawn = draw_shots(samples, 3, seed=1)
    assert [s.category for s in drawn] == ["a"] * 3 + ["b"] * 3
    assert drawn == draw_shots(samples, 3, seed=1)
    draws = {tuple(s.path.name for s in draw_shots(samples, 3, seed=k)) for k in range(5)}
    assert len(draws) > 1
    assert len(draw_shots(samples, 100, seed=0)) == 16
    assert np.all([s.label == 0 for s in drawn])
