"""Result types shared by the detector, run directories and the CLI: scored images and evaluations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .data.images import Sample
from .metrics import METRIC_NAMES

Metrics = dict[str, float]


@dataclass
class ScoredImages:
    """Scores (and maps, masks) of a list of samples, in the samples' order."""

    samples: list[Sample]
    scores: np.ndarray  # (N,) float32
    # (N, map_h, map_w) float16, unless dropped after streaming the metrics; a list of each image's stitched map
    # for tiled models
    maps: np.ndarray | list[np.ndarray] | None = None
    masks: np.ndarray | list[np.ndarray] | None = None  # uint8 0/1 like `maps`, when ground truth was read
    embeddings: np.ndarray | None = None  # (N, C) unit mean-token embeddings


@dataclass
class Evaluation:
    """Metrics per category and their mean; with repeated runs (few-shot draws) the values are means over the
    repeats and `std` holds their standard deviations. Categories named "dataset/category" (several data roots)
    are also summarised per dataset."""

    metrics: dict[str, Metrics]  # category -> metric name -> value
    images: list[ScoredImages] = field(default_factory=list)
    std: dict[str, Metrics] | None = None  # category or "mean" -> std over repeats
    repeats: list[Evaluation] = field(default_factory=list)
    recall: list[RecallRow] | None = None  # decisions per defect type at the calibrated thresholds, when known

    @property
    def mean(self) -> Metrics:
        return mean_metrics(self.metrics.values())

    @property
    def datasets(self) -> dict[str, Metrics]:
        """Mean metrics per dataset, when categories are qualified as "dataset/category"."""
        names = sorted({c.split("/", 1)[0] for c in self.metrics if "/" in c})
        return {d: mean_metrics(v for c, v in self.metrics.items() if c.startswith(d + "/")) for d in names}

    def to_json(self) -> dict:
        """The metrics.json content: fractions in [0, 1], null where a metric cannot be computed."""
        content: dict = {"categories": {c: _finite(v) for c, v in self.metrics.items()}, "mean": _finite(self.mean)}
        if self.datasets:
            content["datasets"] = {d: _finite(v) for d, v in self.datasets.items()}
        if self.std is not None:
            content["std"] = {c: _finite(v) for c, v in self.std.items()}
            content["repeats"] = [r.to_json() for r in self.repeats]
        return content

    def rows(self) -> list[tuple[str, Metrics, Metrics | None]]:
        """(name, values, std or None) per category, per dataset, and for the mean."""
        std = self.std or {}
        rows = [(c, v, std.get(c)) for c, v in self.metrics.items()]
        rows += [(f"{d} (mean)", v, None) for d, v in self.datasets.items()]
        return [*rows, ("mean", self.mean, std.get("mean"))]

    def table(self) -> str:
        """A plain-text table in percent; "mean ± std" cells when there were repeats."""
        rows = self.rows()
        width = max(8, *(len(name) for name, _, _ in rows))
        cell = 14 if self.std is not None else 8
        lines = [f"{'category':<{width}} " + " ".join(f"{m:>{cell}}" for m in METRIC_NAMES)]
        for name, values, std in rows:
            lines.append(f"{name:<{width}} " + " ".join(
                f"{_percent(values[m], std[m] if std else None):>{cell}}" for m in METRIC_NAMES))
        return "\n".join(lines)


@dataclass
class RecallRow:
    """The decisions on one category's test images of one defect type: "good" (the false rejects), a defect type,
    or "all defects" together."""

    category: str
    defect_type: str
    images: int
    defective: int  # images decided defective
    image_threshold: float
    min_defect_area: float

    @property
    def measure(self) -> str:
        return "false reject" if self.defect_type == "good" else "recall"

    @property
    def rate(self) -> float:
        return self.defective / self.images


def recall_rows(decisions: Sequence[tuple[Sample, bool, float, float]]) -> list[RecallRow]:
    """Per category: a row per defect type, one for all defects together (with several types) and one for the good
    images, from (sample, decided defective, image threshold, minimum defect area) of each test image."""
    rows = []
    for category in sorted({sample.category for sample, *_ in decisions}):
        items = [d for d in decisions if d[0].category == category]
        _, _, threshold, area = items[0]
        groups = {}
        for sample, defective, *_ in items:
            groups.setdefault("good" if sample.label == 0 else sample.defect_type, []).append(defective)
        types = sorted(t for t in groups if t != "good")
        if len(types) > 1:
            groups["all defects"] = [d for t in types for d in groups[t]]
            types.append("all defects")
        rows += [RecallRow(category, t, len(groups[t]), int(sum(groups[t])), threshold, area)
                 for t in [*types, *(["good"] if "good" in groups else [])]]
    return rows


def recall_table(rows: Sequence[RecallRow]) -> str:
    """A plain-text table of `recall_rows`: defective/images and the rate in percent."""
    width = max(8, *(len(r.category) for r in rows))
    type_width = max(11, *(len(r.defect_type) for r in rows))
    lines = [f"{'category':<{width}} {'defect type':<{type_width}} {'defective/images':>16} {'rate %':>7}"]
    lines += [f"{r.category:<{width}} {r.defect_type:<{type_width}} {f'{r.defective}/{r.images}':>16} "
              f"{100 * r.rate:>7.2f}  {r.measure}" for r in rows]
    return "\n".join(lines)


def mean_metrics(metrics: Sequence[Metrics] | object) -> Metrics:
    values = list(metrics)
    return {m: float(np.mean([v[m] for v in values])) if values else float("nan") for m in METRIC_NAMES}


def merge(evaluations: Sequence[Evaluation]) -> Evaluation:
    """One evaluation from several models that each covered some categories (e.g. one model per category)."""
    metrics = {c: v for e in evaluations for c, v in e.metrics.items()}
    return Evaluation(metrics, [i for e in evaluations for i in e.images])


def combine_repeats(repeats: Sequence[Evaluation]) -> Evaluation:
    """Mean and standard deviation over independent repeats of the same experiment."""
    if len(repeats) == 1:
        return repeats[0]
    categories = list(repeats[0].metrics)
    metrics = {c: mean_metrics(r.metrics[c] for r in repeats) for c in categories}
    std = {c: {m: float(np.std([r.metrics[c][m] for r in repeats])) for m in METRIC_NAMES} for c in categories}
    std["mean"] = {m: float(np.std([r.mean[m] for r in repeats])) for m in METRIC_NAMES}
    return Evaluation(metrics, [i for r in repeats for i in r.images], std, list(repeats))


def _finite(values: Metrics) -> dict[str, float | None]:
    return {m: (None if np.isnan(v) else v) for m, v in values.items()}


def _percent(value: float, std: float | None = None) -> str:
    if np.isnan(value):
        return "n/a"
    return f"{100 * value:.2f}" if std is None else f"{100 * value:.2f}±{100 * std:.2f}"
