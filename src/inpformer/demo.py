"""The embedded default job: a short training and evaluation on real electroluminescence images of solar cells
(ELPV, shipped by PyPI `elpv-dataset`, image labels only), with the offline DINOv2 ViT-S/14."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

from .data.images import Sample
from .detector import Evaluation, INPFormer
from .errors import InpformerError
from .runs import log_to_file, write_results
from .visualize import save_heatmaps

NUM_TRAIN, NUM_TEST_PER_CLASS = 150, 50


def elpv_samples(seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Monocrystalline cells: certainly good (probability 0) for training and testing, certainly defective
    (probability 1) for testing; a seeded, disjoint split."""
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise InpformerError("the demo needs the ELPV images: pip install 'elpv-dataset==1.0.0.post1'")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    good, defective = [], []
    for line in (data / "labels.csv").read_text().splitlines():
        name, probability, kind = line.split()
        if kind != "mono" or probability not in ("0.0", "1.0"):
            continue
        (good if probability == "0.0" else defective).append(data / name)
    rng = random.Random(seed)
    rng.shuffle(good)
    rng.shuffle(defective)
    train = [Sample(p, "solar_cell", 0, "good", None, "elpv") for p in good[:NUM_TRAIN]]
    test = [Sample(p, "solar_cell", 0, "good", None, "elpv") for p in good[NUM_TRAIN:][:NUM_TEST_PER_CLASS]]
    test += [Sample(p, "solar_cell", 1, "defective", None, "elpv") for p in defective[:NUM_TEST_PER_CLASS]]
    return train, test


def run_demo(out: str | Path = "runs/demo", iterations: int | None = None, progress: bool = True) -> Evaluation:
    """Trains the `cpu` preset on 150 good cells, tests on 50 good + 50 defective ones, writes heat maps."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with log_to_file(out / "demo.log"):
        train, test = elpv_samples()
        detector = INPFormer(preset="cpu", iterations=iterations or 200).fit(train, progress=progress)
        detector.save(out / "model.pt")
        evaluation = detector.evaluate(test, progress=progress, keep_maps=True)
        write_results(out, evaluation, save_maps=False)
        save_heatmaps(evaluation.images[0], detector.preprocess, out / "heatmaps")
    return evaluation
