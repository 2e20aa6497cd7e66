"""A self-contained HTML report (images embedded as data URIs, so it opens from disk and can be mailed):
a gallery sorted by score with decisions, and, with ground truth, metrics, ROC / PR curves and score histograms."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import precision_recall_curve, roc_curve

from .files import write_text_atomically
from .metrics import METRIC_NAMES

THUMBNAIL_SIZE = 224


@dataclass
class GalleryItem:
    source: str
    category: str
    score: float
    normalized_score: float | None  # None when the model has no calibrated threshold
    decision: str | None
    thumbnail: str  # data URI
    label: int | None = None  # ground truth (0 good, 1 defective), when known
    link: str | None = None  # relative path of the full-size overlay


def image_uri(image: np.ndarray, max_side: int = THUMBNAIL_SIZE) -> str:
    """A JPEG data URI of an RGB image, downscaled so that its longer side is at most `max_side`."""
    picture = Image.fromarray(image)
    picture.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _figure_uri(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def score_figures(items: Sequence[GalleryItem]) -> list[tuple[str, str]]:
    """(title, data URI) of the figures the items support: a score histogram (good vs defective when labelled,
    normalised scores with the 0.5 threshold when calibrated) and, with both labels, ROC and PR curves per category."""
    figures = []
    normalised = all(i.normalized_score is not None for i in items)
    values = np.array([i.normalized_score if normalised else i.score for i in items], dtype=float)
    labels = np.array([-1 if i.label is None else i.label for i in items])
    figure = Figure(figsize=(6, 3.2))
    axis = figure.subplots()
    low, high = (0.0, 1.0) if normalised else (values.min(), values.max())
    bins = np.linspace(min(low, values.min()), max(high, values.max()), 41)
    if (labels >= 0).all():
        axis.hist(values[labels == 0], bins=bins, alpha=0.6, label="good", color="tab:green")
        axis.hist(values[labels == 1], bins=bins, alpha=0.6, label="defective", color="tab:red")
        axis.legend()
    else:
        axis.hist(values, bins=bins, color="tab:blue")
    if normalised:
        axis.axvline(0.5, color="black", linestyle="--", linewidth=1)
    axis.set_xlabel("normalised score (threshold 0.5)" if normalised else "score")
    axis.set_ylabel("images")
    figures.append(("Score histogram", _figure_uri(figure)))
    categories = sorted({i.category for i in items})
    curves = [(c, labels[mask], np.array([i.score for i in items])[mask])
              for c in categories for mask in [np.array([i.category == c for i in items])]]
    curves = [(c, y, s) for c, y, s in curves if set(y.tolist()) == {0, 1}]
    if curves:
        figure = Figure(figsize=(9, 3.6))
        roc_axis, pr_axis = figure.subplots(1, 2)
        for category, y, s in curves:
            fpr, tpr, _ = roc_curve(y, s)
            precision, recall, _ = precision_recall_curve(y, s)
            roc_axis.plot(fpr, tpr, label=category)
            pr_axis.plot(recall, precision, label=category)
        roc_axis.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
        pr_axis.set(xlabel="recall", ylabel="precision", title="Precision-recall")
        roc_axis.legend(fontsize=8)
        figures.append(("ROC and precision-recall curves (image level)", _figure_uri(figure)))
    return figures


def write_report(path: str | Path, title: str, items: Sequence[GalleryItem], summary: dict[str, str],
                 metrics: dict[str, dict[str, float]] | None = None,
                 tables: Sequence[tuple[str, Sequence[str], Sequence[Sequence[object]]]] = ()) -> Path:
    """Writes the report; `summary` is shown as a key/value table, `metrics` (category -> metric -> fraction)
    as the metrics table, each of `tables` (title, column names, rows) after it."""
    path = Path(path)
    ordered = sorted(items, key=lambda i: -(i.normalized_score if i.normalized_score is not None else i.score))
    parts = [f"<h1>{_e(title)}</h1>", _key_values(summary)]
    if metrics:
        parts.append("<h2>Metrics (%)</h2>" + _metrics_table(metrics))
    for table_title, columns, rows in tables:
        head = "<tr>" + "".join(f"<th>{_e(c)}</th>" for c in columns) + "</tr>"
        body = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>" for row in rows)
        parts.append(f"<h2>{_e(table_title)}</h2><table class='metrics'>{head}{body}</table>")
    if items:
        parts += [f"<h2>{_e(t)}</h2><img class='figure' src='{uri}' alt='{_e(t)}'>" for t, uri in score_figures(items)]
    parts.append(f"<h2>Gallery ({len(items)} images, highest score first)</h2><div class='gallery'>")
    parts += [_card(i) for i in ordered]
    parts.append("</div>")
    write_text_atomically(path, _PAGE.format(title=_e(title), body="\n".join(parts)))
    return path


def _card(item: GalleryItem) -> str:
    image = f"<img src='{item.thumbnail}' alt='{_e(Path(item.source).name)}'>"
    if item.link:
        image = f"<a href='{_e(item.link)}'>{image}</a>"
    decision = f"<span class='badge {item.decision}'>{item.decision}</span>" if item.decision else ""
    truth = "" if item.label is None else f" · truth: {'defective' if item.label else 'good'}"
    normalised = "" if item.normalized_score is None else f" · normalised {item.normalized_score:.3f}"
    return (f"<figure class='card'>{image}<figcaption>{decision} score {item.score:.5f}{normalised}{truth}"
            f"<br><span class='source'>{_e(item.category)} · {_e(item.source)}</span></figcaption></figure>")


def _key_values(values: dict[str, str]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in values.items())
    return f"<table class='summary'>{rows}</table>"


def _metrics_table(metrics: dict[str, dict[str, float]]) -> str:
    head = "<tr><th>category</th>" + "".join(f"<th>{m}</th>" for m in METRIC_NAMES) + "</tr>"
    rows = "".join("<tr><td>" + _e(name) + "</td>" + "".join(
        f"<td>{'n/a' if np.isnan(v[m]) else f'{100 * v[m]:.2f}'}</td>" for m in METRIC_NAMES) + "</tr>"
        for name, v in metrics.items())
    return f"<table class='metrics'>{head}{rows}</table>"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }}
table {{ border-collapse: collapse; margin: .5rem 0 1rem; }}
th, td {{ border: 1px solid #ddd; padding: .25rem .6rem; text-align: left; font-size: .9rem; }}
table.metrics td {{ text-align: right; }}
img.figure {{ max-width: 100%; }}
.gallery {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(240px, 1fr)); gap: .8rem; }}
.card {{ margin: 0; border: 1px solid #ddd; border-radius: 6px; padding: .4rem; font-size: .85rem; }}
.card img {{ width: 100%; height: auto; }}
.source {{ color: #666; word-break: break-all; }}
.badge {{ padding: .05rem .4rem; border-radius: 4px; color: white; font-weight: 600; }}
.badge.defective {{ background: #c62828; }} .badge.good {{ background: #2e7d32; }}
</style></head><body>
{body}
</body></html>
"""
