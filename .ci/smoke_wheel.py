"""Smoke test of an installed inpformer wheel, run by .ci/check_wheel.sh from an empty folder outside the repository.

usage: python -I smoke_wheel.py REPO WHEEL SDIST

Checks that the wheel holds the package data and the sdist what a build needs, then runs the installed `inpformer`
command: --help of the program and of every subcommand, and a tiny train / test / predict / export on generated
images with the random tiny backbone. Nothing is imported from the source tree (`-I` keeps the script's folder and
the current folder off sys.path; the check below makes sure).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

import inpformer
from inpformer.cli import main

TINY = ["--backbone", "tiny_random", "--image-size", "64", "--crop-size", "56", "--iterations", "10",
        "--batch-size", "4", "--warmup-iterations", "2", "--quiet"]


def check_distributions(repo: Path, wheel: Path, sdist: Path) -> None:
    """The wheel has every file of the package's static folder and the licence; the sdist has README, pyproject,
    the licence and all of src."""
    package = repo / "src" / "inpformer"
    static = {p.relative_to(package.parent).as_posix() for p in (package / "service" / "static").iterdir()}
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    missing = static - set(names)
    assert static and not missing, f"{wheel.name} lacks package data: {sorted(missing)}"
    assert any(".dist-info/licenses/LICENSE" in name for name in names), f"{wheel.name} lacks the LICENSE"

    sources = {p.relative_to(repo).as_posix() for p in package.rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    needed = sources | {"README.md", "pyproject.toml"} | {p.name for p in repo.glob("LICENSE*")}
    with tarfile.open(sdist) as archive:
        root = archive.getnames()[0].split("/")[0]
        missing = needed - {name.removeprefix(root + "/") for name in archive.getnames()}
    assert not missing, f"{sdist.name} lacks {sorted(missing)}"


def write_dataset(root: Path, rng: np.random.Generator) -> None:
    """A one-category MVTec AD tree of 64 px images: smooth noise; defects are dark squares."""
    def texture() -> np.ndarray:
        coarse = rng.integers(90, 170, size=(6, 6, 3), dtype=np.uint8)
        return np.asarray(Image.fromarray(coarse).resize((64, 64), Image.Resampling.BICUBIC)).copy()

    def save(path: Path, image: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)

    for i in range(8):
        save(root / "train" / "good" / f"{i:03d}.png", texture())
    for i in range(3):
        save(root / "test" / "good" / f"{i:03d}.png", texture())
        image, mask = texture(), np.zeros((64, 64), np.uint8)
        image[20:36, 24:40] = 10
        mask[20:36, 24:40] = 255
        save(root / "test" / "spot" / f"{i:03d}.png", image)
        save(root / "ground_truth" / "spot" / f"{i:03d}_mask.png", mask)


def run(*argv: str) -> str:
    """Run the installed console script; returns its standard output."""
    command = Path(sys.executable).parent / "inpformer"
    result = subprocess.run([str(command), *argv], capture_output=True, text=True)
    assert result.returncode == 0, f"inpformer {' '.join(argv)}: exit {result.returncode}\n{result.stderr}"
    return result.stdout


def check_commands() -> None:
    usage = run("--help")
    subcommands = re.search(r"\{([\w,-]+)\}", usage).group(1).split(",")
    assert {"train", "test", "predict", "export", "serve", "watch"} <= set(subcommands), usage
    for subcommand in subcommands:  # in this process: one import instead of one per subcommand
        with contextlib.redirect_stdout(io.StringIO()) as help_text, contextlib.suppress(SystemExit):
            main([subcommand, "--help"])
        assert help_text.getvalue().startswith(f"usage: inpformer {subcommand}"), help_text.getvalue()

    write_dataset(Path("data/part"), np.random.default_rng(0))
    run("train", "--data", "data/part", "--out", "run", *TINY)
    run("test", "run", "--quiet")
    metrics = json.loads(Path("run/metrics.json").read_text())
    assert set(metrics["categories"]) == {"part"}, metrics
    run("predict", "run", "data/part/test", "--out", "predictions", "--quiet")
    predictions = json.loads(Path("predictions/predictions.json").read_text())
    decisions = [p["decision"] for p in predictions["predictions"]]
    assert len(decisions) == 6 and set(decisions) <= {"good", "defective"}, predictions
    run("export", "run", "--onnx", "part.onnx")
    run("predict", "part.onnx", "data/part/test", "--runtime", "onnx", "--out", "predictions-onnx", "--quiet")


if __name__ == "__main__":
    repo, wheel, sdist = (Path(arg).resolve() for arg in sys.argv[1:4])
    installed = Path(inpformer.__file__).resolve()
    assert installed.is_relative_to(Path(sys.prefix).resolve()), f"inpformer imported from {installed}, not the venv"
    assert not Path.cwd().resolve().is_relative_to(repo), "run it from a folder outside the repository"
    check_distributions(repo, wheel, sdist)
    check_commands()
    print(f"wheel smoke test passed: inpformer {inpformer.__version__} from {installed.parent}")
