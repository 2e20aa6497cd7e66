import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from synthetic import make_mvtec, save_image
from torchvision import transforms
from torchvision.transforms import v2

from inpformer.data.geometry import mask_on_map
from inpformer.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDataset,
    Preprocess,
    Sample,
    find_categories,
    load_mvtec,
    read_image,
    read_mask,
)
from inpformer.errors import InpformerError


def _rgb(h=24, w=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _check_error(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert str(needle) in message


# ----------------------------------------------------------------------------------------------------
# read_image / read_mask


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif", ".tiff", ".jpg", ".JPEG", ".PNG"])
def test_read_image_formats(tmp_path, ext):
    image = np.kron(_rgb(3, 4), np.ones((8, 8, 1), dtype=np.uint8))  # blocks survive JPEG well
    path = save_image(tmp_path / f"img{ext}", image)
    out = read_image(path)
    assert out.shape == (24, 32, 3) and out.dtype == np.uint8
    tolerance = 12 if ext.lower() in (".jpg", ".jpeg") else 0
    assert np.abs(out.astype(int) - image).mean() <= tolerance


def test_read_image_grayscale_and_alpha_and_palette(tmp_path):
    grey = _rgb()[..., 0]
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    out = read_image(tmp_path / "grey.png")
    assert out.shape == (24, 32, 3)
    assert all(np.array_equal(out[..., c], grey) for c in range(3))

    rgba = np.dstack([_rgb(), np.zeros((24, 32), dtype=np.uint8)])  # fully transparent: alpha is dropped
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(read_image(tmp_path / "rgba.png"), rgba[..., :3])

    Image.fromarray(_rgb()).convert("P").save(tmp_path / "palette.png")
    assert read_image(tmp_path / "palette.png").shape == (24, 32, 3)


def test_read_image_16bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    out = read_image(tmp_path / "deep.png")
    assert out[..., 0].tolist() == [[0, 1, 128, 255]]
    assert np.array_equal(out[..., 0], out[..., 2])


def test_read_image_float(tmp_path):
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    Image.fromarray(values).save(tmp_path / "float.tif")
    assert read_image(tmp_path / "float.tif")[..., 1].tolist() == [[0, 128, 255]]


def test_read_image_applies_exif_orientation(tmp_path):
    image = np.zeros((32, 64, 3), dtype=np.uint8)
    image[:16, :16] = (255, 0, 0)  # red top-left corner
    pil = Image.fromarray(image)
    exif = pil.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    pil.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    out = read_image(tmp_path / "rotated.jpg")
    assert out.shape == (64, 32, 3)
    assert out[:16, -16:, 0].mean() > 200 and out[:16, :16, 0].mean() < 50  # corner now top-right


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_truncated_image_error_names_file(tmp_path, ext):
    path = save_image(tmp_path / f"broken{ext}", _rgb(64, 64))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InpformerError) as excinfo:
        read_image(path)
    _check_error(excinfo, path, "cannot read image")


def test_non_image_and_missing_file_errors(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(InpformerError) as excinfo:
        read_image(text)
    _check_error(excinfo, text, "cannot read image")
    with pytest.raises(InpformerError) as excinfo:
        read_mask(tmp_path / "absent.png")
    _check_error(excinfo, tmp_path / "absent.png", "cannot read mask", "not found")


def test_too_large_image_error(tmp_path):
    path = save_image(tmp_path / "big.png", _rgb(40, 40))
    assert read_image(path, max_pixels=1600).shape == (40, 40, 3)
    with pytest.raises(InpformerError) as excinfo:
        read_image(path, max_pixels=1599)
    _check_error(excinfo, path, "too large")


def test_read_mask_binarises_at_half_range(tmp_path):
    Image.fromarray(np.array([[0, 127, 128, 255]], dtype=np.uint8)).save(tmp_path / "m8.png")
    assert read_mask(tmp_path / "m8.png").tolist() == [[False, False, True, True]]

    Image.fromarray(np.array([[0, 255, 32767, 32768, 65535]], dtype=np.uint16)).save(tmp_path / "m16.png")
    assert read_mask(tmp_path / "m16.png").tolist() == [[False, False, False, True, True]]

    Image.fromarray(np.array([[False, True, True]])).save(tmp_path / "m1.png")
    assert Image.open(tmp_path / "m1.png").mode == "1"
    assert read_mask(tmp_path / "m1.png").tolist() == [[False, True, True]]

    rgb = np.zeros((1, 3, 3), dtype=np.uint8)
    rgb[0, 1, 0] = 200  # red only
    rgb[0, 2] = (100, 100, 100)
    Image.fromarray(rgb).save(tmp_path / "mrgb.png")
    assert read_mask(tmp_path / "mrgb.png").tolist() == [[False, True, False]]

    Image.fromarray(np.array([[0, 1, 0]], dtype=np.uint8)).save(tmp_path / "labels.png")
    assert read_mask(tmp_path / "labels.png").tolist() == [[False, True, False]]
    assert read_mask(tmp_path / "m8.png").dtype == bool


# ----------------------------------------------------------------------------------------------------
# dataset discovery


def test_find_categories_on_root_and_single_category(tmp_path):
    root = make_mvtec(tmp_path / "mvtec", categories=("zeta", "alpha"), n_train=1, n_good_test=1)
    (root / "notes").mkdir()  # not a category
    (root / "readme.txt").write_text("x")
    assert find_categories(root) == ["alpha", "zeta"]
    assert find_categories(root / "zeta") == ["zeta"]
    assert find_categories(str(root / "alpha")) == ["alpha"]


def test_find_categories_errors(tmp_path):
    with pytest.raises(InpformerError) as excinfo:
        find_categories(tmp_path)
    _check_error(excinfo, tmp_path, "train/good")
    with pytest.raises(InpformerError) as excinfo:
        find_categories(tmp_path / "missing")
    _check_error(excinfo, tmp_path / "missing", "not found")


def test_load_mvtec_train_and_test(tmp_path):
    defects = {"dent": 2, "cut": 1}
    root = make_mvtec(tmp_path, categories=("b", "a"), n_train=4, n_good_test=2, defect_types=defects)
    train = load_mvtec(root, "train")
    assert len(train) == 8
    assert [(s.category, s.path.name) for s in train[:5]] == [
        ("a", "000.png"), ("a", "001.png"), ("a", "002.png"), ("a", "003.png"), ("b", "000.png"),
    ]  # fmt: skip
    assert all(s.label == 0 and s.defect_type == "good" and s.mask_path is None for s in train)
    assert all(s.dataset == "mvtec" for s in train)

    test = load_mvtec(root, "test", categories=["b"])
    expected = [("cut", 1), ("dent", 1), ("dent", 1), ("good", 0), ("good", 0)]
    assert [(s.defect_type, s.label) for s in test] == expected
    assert test[0].mask_path == root / "b" / "ground_truth" / "cut" / "000_mask.png"
    assert all((s.mask_path is None) == (s.label == 0) for s in test)
    assert test == load_mvtec(root, "test", categories=["b"])  # deterministic
    assert isinstance(test[0], Sample)
    with pytest.raises(AttributeError):
        test[0].label = 0  # frozen


def test_load_mvtec_single_category_folder(tmp_path):
    root = make_mvtec(tmp_path, categories=("widget",), n_train=3, n_good_test=1)
    train = load_mvtec(root / "widget", "train")
    assert len(train) == 3 and {s.category for s in train} == {"widget"}
    assert len(load_mvtec(root / "widget", "test", categories=["widget"])) == 4


def test_load_mvtec_accepts_alternative_mask_names(tmp_path):
    root = make_mvtec(tmp_path, n_train=1, n_good_test=0, defect_types={"scratch": 2})
    gt = root / "widget" / "ground_truth" / "scratch"
    (gt / "000_mask.png").rename(gt / "000.png")
    Image.open(gt / "001_mask.png").save(gt / "001_mask.BMP")
    (gt / "001_mask.png").unlink()
    masks = [s.mask_path.name for s in load_mvtec(root, "test")]
    assert masks == ["000.png", "001_mask.BMP"]


def test_load_mvtec_missing_mask_error(tmp_path):
    root = make_mvtec(tmp_path, n_train=1, n_good_test=1, defect_types={"scratch": 2})
    (root / "widget" / "ground_truth" / "scratch" / "001_mask.png").unlink()
    with pytest.raises(InpformerError) as excinfo:
        load_mvtec(root, "test")
    _check_error(excinfo, root / "widget" / "test" / "scratch" / "001.png", "001_mask.png")


def test_load_mvtec_unknown_category_and_split(tmp_path):
    root = make_mvtec(tmp_path, categories=("bottle", "cable"), n_train=1, n_good_test=1)
    with pytest.raises(InpformerError) as excinfo:
        load_mvtec(root, "train", categories=["bottle", "screw"])
    _check_error(excinfo, "screw", "bottle, cable")
    with pytest.raises(InpformerError) as excinfo:
        load_mvtec(root, "validation")
    _check_error(excinfo, "validation")


def test_load_mvtec_empty_train_folder(tmp_path):
    root = make_mvtec(tmp_path, n_train=0, n_good_test=1)
    (root / "widget" / "train" / "good").mkdir(parents=True)
    (root / "widget" / "train" / "good" / "thumbs.db").write_text("x")
    with pytest.raises(InpformerError) as excinfo:
        load_mvtec(root, "train")
    _check_error(excinfo, root / "widget" / "train" / "good", "no images found", "train/good/*.png")


# ----------------------------------------------------------------------------------------------------
# preprocessing and dataset


def test_preprocess_shape_and_normalisation():
    preprocess = Preprocess(image_size=40, crop_size=32)
    image = np.empty((50, 70, 3), dtype=np.uint8)
    image[:] = (0, 128, 255)
    out = preprocess(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = (torch.tensor([0, 128, 255]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-5)
    assert torch.allclose(out.std(dim=(1, 2)), torch.zeros(3), atol=1e-5)


def test_preprocess_matches_torchvision():
    image = _rgb(45, 61, seed=3)
    reference = v2.Compose([
        v2.Resize((36, 36)),
        v2.CenterCrop(27),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])(Image.fromarray(image))  # fmt: skip
    assert torch.allclose(Preprocess(36, 27)(image), reference, atol=1e-5)


def test_preprocess_mask_geometry_matches_image():
    image = np.zeros((90, 120, 3), dtype=np.uint8)
    mask = np.zeros((90, 120), dtype=bool)
    image[20:50, 70:100] = 255
    mask[20:50, 70:100] = True
    preprocess = Preprocess(image_size=48, crop_size=40, mean=(0, 0, 0), std=(1, 1, 1))
    bright = preprocess(image)[0].numpy() > 0.5
    coverage = preprocess.mask(mask)
    assert coverage.shape == (40, 40) and coverage.dtype == np.uint8
    out = coverage > 127.5
    assert out.sum() > 50
    assert (bright & out).sum() / (bright | out).sum() > 0.85


@pytest.mark.parametrize(("image_size", "crop_size"), [(64, 56), (448, 392), (224, 224)])
def test_ground_truth_follows_the_reference_protocol(image_size, crop_size):
    """The 0/255 mask resized bilinearly with the image, centre-cropped, resized to the 256 map nearest neighbour,
    then > 0.5: written here with the reference's torchvision transforms."""
    rng = np.random.default_rng(0)
    mask = np.zeros((300, 260), bool)
    for _ in range(6):
        y, x, h, w = rng.integers(0, 250), rng.integers(0, 210), rng.integers(1, 40), rng.integers(1, 40)
        mask[y : y + h, x : x + w] = True
    reference = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.CenterCrop(crop_size),
                                    transforms.ToTensor()])(Image.fromarray(mask.astype(np.uint8) * 255))
    reference = F.interpolate(reference[None], size=256, mode="nearest")[0, 0] > 0.5
    coverage = torch.from_numpy(Preprocess(image_size, crop_size).mask(mask).copy())[None]
    ours = mask_on_map(coverage, (256, 256))[0]
    assert torch.equal(ours.bool(), reference)


def test_preprocess_rejects_bad_sizes():
    with pytest.raises(InpformerError, match="--crop-size 64 does not fit"):
        Preprocess(image_size=32, crop_size=64)


def test_image_dataset_items(tmp_path):
    root = make_mvtec(tmp_path, n_train=2, n_good_test=1, defect_types={"scratch": 1}, size=64)
    samples = load_mvtec(root, "test")
    dataset = ImageDataset(samples, Preprocess(64, 48), with_masks=True)
    assert len(dataset) == 2
    good, defect = dataset[0], dataset[1]  # "good" sorts before "scratch"
    assert defect["image"].shape == (3, 48, 48) and defect["image"].dtype == torch.float32
    assert (defect["label"], defect["index"], good["label"], good["index"]) == (1, 1, 0, 0)
    assert defect["mask"].dtype == torch.uint8 and defect["mask"].shape == (48, 48)
    assert {0, 255} <= set(defect["mask"].unique().tolist())  # defect coverage, 0..255
    assert good["mask"].sum() == 0 and good["mask"].shape == (48, 48)

    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))
    assert batch["image"].shape == (2, 3, 48, 48) and batch["label"].tolist() == [0, 1]

    plain = ImageDataset(load_mvtec(root, "train"), Preprocess(64, 48))
    assert set(plain[1]) == {"image", "valid", "label", "index"}
    assert plain[1]["valid"].tolist() == [0, 0, 1, 1]  # stretched: the whole input is the image


def test_image_dataset_mask_size_mismatch(tmp_path):
    root = make_mvtec(tmp_path, n_train=1, n_good_test=0, defect_types={"scratch": 1})
    mask_path = root / "widget" / "ground_truth" / "scratch" / "000_mask.png"
    Image.new("L", (10, 10)).save(mask_path)
    dataset = ImageDataset(load_mvtec(root, "test"), Preprocess(32, 32), with_masks=True)
    with pytest.raises(InpformerError) as excinfo:
        dataset[0]
    _check_error(excinfo, mask_path)


def test_make_mvtec_is_deterministic_with_visible_defects(tmp_path):
    first = make_mvtec(tmp_path / "a", seed=1, defect_types={"scratch": 4})
    second = make_mvtec(tmp_path / "b", seed=1, defect_types={"scratch": 4})
    for path in sorted((first / "widget").rglob("*.png")):
        assert path.read_bytes() == (second / path.relative_to(first)).read_bytes()
    for sample in load_mvtec(first, "test"):
        if sample.label == 1:
            mask = read_mask(sample.mask_path)
            assert 0.04 < mask.mean() < 0.16
            image = read_image(sample.path).astype(float)
            assert abs(image[mask].mean() - image[~mask].mean()) > 60
