"""Operator feedback: an image an operator marks on the service's page as a false reject ("this part is good") or a
missed defect ("this part is defective") is kept as DIR/good/<name>.png or DIR/defective/<name>.png, with a JSON
sidecar <name>.json: the mark, the decision it corrects, score, threshold, category, model and time.

The PNG holds the pixels the model judged (the upload as the predictor read it), so `inpformer calibrate RUN
--data-good DIR/good` and `inpformer train ... --extra-good DIR/good` see what the operator saw."""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InpformerError
from ..files import output_folder, write_atomically, write_text_atomically

LABELS = ("good", "defective")


def feedback_folders(folder: str | Path) -> Path:
    """Creates DIR/good and DIR/defective (`--feedback-dir DIR`); returns DIR."""
    folder = Path(folder)
    for label in LABELS:
        output_folder(folder / label, "--feedback-dir")
    return folder


def parse_mark(label: str, result: str) -> dict:
    """The fields of a /predict result (JSON text) that a mark keeps, checked; InpformerError says what is wrong."""
    if label not in LABELS:
        raise InpformerError(f"label must be one of {', '.join(LABELS)}, got {label[:100]!r}")
    try:
        fields = json.loads(result)
    except ValueError:
        raise InpformerError("result: not JSON; send the result object /predict returned for this image") from None
    if not isinstance(fields, dict):
        raise InpformerError("result: expected the JSON object /predict returned for this image")
    kept = {}
    for name, kind in (("decision", str), ("score", float), ("normalized_score", float), ("threshold", float),
                       ("category", str), ("source", str)):
        value = fields.get(name)
        if value is None and name in ("normalized_score", "category", "source"):
            continue
        if kind is str and isinstance(value, str):
            kept[name] = value[:100]
        elif kind is float and isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            kept[name] = float(value)
        else:
            raise InpformerError(f"result: {name!r} missing or not a {'text' if kind is str else 'finite number'}")
    if kept["decision"] not in LABELS:
        raise InpformerError(f"result: 'decision' must be one of {', '.join(LABELS)}")
    return kept


def store_mark(folder: Path, image: np.ndarray, name: str, label: str, result: dict, model: dict) -> str:
    """Writes DIR/<label>/<stem>.png (a free name: stem-2.png... when taken) and its sidecar; returns the PNG's
    path relative to DIR."""
    target_folder = folder / label
    staging = write_atomically(target_folder / f".mark-{uuid.uuid4().hex}.png",
                               lambda path: Image.fromarray(image).save(path, "PNG"))
    try:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name.replace("\\", "/")).stem).strip("._")[:80] or "image"
        for count in range(1, 10_000):
            target = target_folder / (f"{stem}.png" if count == 1 else f"{stem}-{count}.png")
            try:
                os.link(staging, target)  # claims the name atomically, also against concurrent marks
                break
            except FileExistsError:
                continue
        else:
            raise InpformerError(f"{target_folder}: no free name for {stem}.png; clear the folder")
    finally:
        staging.unlink()
    sidecar = {"label": label, **result, "image": target.name, "width": image.shape[1], "height": image.shape[0],
               "model": model, "time": datetime.now().astimezone().isoformat(timespec="seconds")}
    write_text_atomically(target.with_suffix(".json"), json.dumps(sidecar, indent=2))
    return f"{label}/{target.name}"
