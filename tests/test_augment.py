"""Few-shot expansion (x22) and shot drawing."""

import numpy as np
import pytest
import torch
from synthetic import make_mvtec

from inpformer.data.augment import FEW_SHOT_EXPANSIONS, ExpandedDataset, draw_shots
from inpformer.data.images import Preprocess, load_mvtec


def reference_warp(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The reference's affine_grid + grid_sample (bilinear, reflection, align_corners False), written out: output
    pixel (i, j) at normalised (x, y) samples the input at matrix @ (x, y, 1), reflected at the image's edges."""
    _, height, width = image.shape
    out = np.empty_like(image)

    def reflect(u: float, size: int) -> float:
        distance = abs(u + 0.5)
        flips, extra = divmod(distance, size)
        u = -0.5 + (extra if flips % 2 == 0 else size - extra)
        return min(max(u, 0.0), size - 1.0)

    for i in range(height):
        for j in range(width):
            x, y = (2 * j + 1) / width - 1, (2 * i + 1) / height - 1
            sx, sy = matrix @ np.array([x, y, 1.0])
            u, v = reflect(((sx + 1) * width - 1) / 2, width), reflect(((sy + 1) * height - 1) / 2, height)
            j0, i0 = int(np.floor(u)), int(np.floor(v))
            j1, i1 = min(j0 + 1, width - 1), min(i0 + 1, height - 1)
            a, b = u - j0, v - i0
            out[:, i, j] = ((1 - a) * (1 - b) * image[:, i0, j0] + a * (1 - b) * image[:, i0, j1]
                            + (1 - a) * b * image[:, i1, j0] + a * b * image[:, i1, j1])
    return out


@pytest.mark.parametrize("shape", [(3, 16, 16), (3, 12, 20)])
def test_expansions_match_the_reference_operations(shape):
    image = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    outputs = [f(image) for f in FEW_SHOT_EXPANSIONS]
    assert len(outputs) == 22 and torch.equal(outputs[0], image)
    assert all(o.shape == image.shape and o.dtype == torch.float32 for o in outputs[:19])  # turns: see below
    angles = [np.pi * k / 16 for k in (-4, -3, -2, -1, 1, 2, 3, 4)]
    shifts = [(0.2, 0.2), (-0.2, 0.2), (-0.2, -0.2), (0.2, -0.2), (0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1), (0.1, -0.1)]
    matrices = [np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0]]) for t in angles]
    matrices += [np.array([[1, 0, a], [0, 1, b]]) for a, b in shifts]
    for output, matrix in zip(outputs[1:17], matrices, strict=True):
        np.testing.assert_allclose(output.numpy(), reference_warp(image.numpy(), matrix), atol=5e-5)  # float32
    assert torch.equal(outputs[17], image.flip(-1))
    gray = 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]  # on the normalised channels, as the reference
    torch.testing.assert_close(outputs[18], gray.expand(3, -1, -1))
    assert len({o.numpy().tobytes() for o in outputs}) == 22


def test_translation_moves_by_a_tenth_of_the_size_and_reflects():
    image = torch.arange(3 * 40 * 40, dtype=torch.float32).reshape(3, 40, 40)
    shifted = FEW_SHOT_EXPANSIONS[9](image)  # (0.2, 0.2) in normalised coordinates: 10 % of 40 = 4 pixels
    torch.testing.assert_close(shifted[:, :-4, :-4], image[:, 4:, 4:])
    torch.testing.assert_close(shifted[:, -4:, :-4], image[:, -4:, 4:].flip(1))  # rows 40..43 reflect to 39..36
    assert not (shifted == 0).all(dim=0).any()  # reflected, never black


def test_quarter_turns_rotate_counter_clockwise():
    image = torch.randn(3, 8, 8)
    for k, turn in zip((1, 2, 3), FEW_SHOT_EXPANSIONS[19:], strict=True):
        assert torch.equal(turn(image), torch.rot90(image, k, (1, 2)))
    assert torch.equal(torch.rot90(torch.tensor([[[1, 2], [3, 4]]]), 1, (1, 2)), torch.tensor([[[2, 4], [1, 3]]]))


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
