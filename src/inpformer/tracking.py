"""Optional experiment logs: the loss and learning rate of every training step, calibration and test metrics, to
TensorBoard (event files under ROOT/tensorboard/) or MLflow (a local SQLite store, ROOT/mlflow.db). Each is an
optional extra, imported only when asked for."""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import InpformerError

TRACKERS = ("tensorboard", "mlflow")


class Tracker:
    """One logged training or test: a TensorBoard run folder or an MLflow run. `id` names it for `open_tracker`'s
    `resume` (a resumed training goes on logging into the same one)."""

    id: str
    resumed: bool

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Records settings once (a resumed tracker has them already and skips this)."""
        if not self.resumed:
            self._log_params({k: str(v) for k, v in params.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Records values at `step`; values that could not be computed (NaN) are left out."""
        finite = {k: float(v) for k, v in metrics.items() if math.isfinite(v)}
        if finite:
            self._log_metrics(finite, step)

    def close(self, finished: bool = True) -> None:
        """Ends the logging; `finished` False marks an interrupted training (MLflow status KILLED)."""

    def _log_params(self, params: dict[str, str]) -> None:
        raise NotImplementedError

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError


def open_tracker(kind: str, root: str | Path, name: str, resume: str | None = None) -> Tracker:
    """A tracker of `kind` ("tensorboard" or "mlflow") for a training or test named `name` (e.g. the model),
    logging under the folder `root`; `resume`: the `id` of a tracker to go on with."""
    if kind == "tensorboard":
        return _TensorBoard(Path(root), name, resume)
    if kind == "mlflow":
        return _MLflow(Path(root), name, resume)
    raise InpformerError(f"unknown --log {kind!r}; choose one of: {', '.join(TRACKERS)}")


class _TensorBoard(Tracker):
    """Scalars in ROOT/tensorboard/<time>-<name>/. A resumed one hides, for TensorBoard, what the interrupted training
    logged from its first step on (the steps after its last saved state, which are logged again)."""

    def __init__(self, root: Path, name: str, resume: str | None):
        self.summary_writer = _import("torch.utils.tensorboard", "tensorboard").SummaryWriter
        self.id, self.resumed = resume or f"{time.strftime('%Y%m%d-%H%M%S')}-{name}", resume is not None
        self.folder, self.writer = root / "tensorboard" / self.id, None

    def _open(self, first_step: int | None = None):
        if self.writer is None:
            self.writer = self.summary_writer(log_dir=str(self.folder), purge_step=first_step if self.resumed else None)
        return self.writer

    def _log_params(self, params: dict[str, str]) -> None:
        self._open().add_text("settings", "\n".join(f"    {k}: {v}" for k, v in params.items()))

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        writer = self._open(step)
        for key, value in metrics.items():
            writer.add_scalar(key, value, step)

    def close(self, finished: bool = True) -> None:
        if self.writer is not None:
            self.writer.close()


class _MLflow(Tracker):
    """A run named `name` in the experiment named after ROOT's folder, in the SQLite store ROOT/mlflow.db
    (`mlflow ui --backend-store-uri sqlite:///ROOT/mlflow.db` shows it). Metrics are written in batches, at most
    `FLUSH_SECONDS` apart: a database write per training step would slow down fast steps."""

    FLUSH_SECONDS, BATCH = 10.0, 1000  # MLflow takes up to 1000 metrics per batch

    def __init__(self, root: Path, name: str, resume: str | None):
        mlflow = _import("mlflow", "mlflow")
        root.mkdir(parents=True, exist_ok=True)
        try:
            self.client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{(root / 'mlflow.db').resolve()}")
        except mlflow.exceptions.MlflowException as error:  # e.g. mlflow-skinny without SQLAlchemy
            raise InpformerError(f"--log mlflow: cannot open {root / 'mlflow.db'} ({str(error).splitlines()[0]}); "
                                 "pip install 'inpformer[mlflow]'") from None
        self.resumed = resume is not None
        if resume:
            self.id = resume
            self.client.update_run(resume, status="RUNNING")
        else:
            experiment = self.client.get_experiment_by_name(root.resolve().name)
            experiment_id = (experiment.experiment_id if experiment else
                             self.client.create_experiment(root.resolve().name))
            self.id = self.client.create_run(experiment_id, run_name=name).info.run_id
        self.entities, self.pending, self.flushed = mlflow.entities, [], time.monotonic()

    def _log_params(self, params: dict[str, str]) -> None:
        self.client.log_batch(self.id, params=[self.entities.Param(k, v) for k, v in params.items()])

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.pending += [self.entities.Metric(k, v, now, step) for k, v in metrics.items()]
        if len(self.pending) >= self.BATCH or time.monotonic() - self.flushed > self.FLUSH_SECONDS:
            self._flush()

    def _flush(self) -> None:
        for start in range(0, len(self.pending), self.BATCH):
            self.client.log_batch(self.id, metrics=self.pending[start : start + self.BATCH])
        self.pending, self.flushed = [], time.monotonic()

    def close(self, finished: bool = True) -> None:
        self._flush()
        self.client.set_terminated(self.id, "FINISHED" if finished else "KILLED")


def _import(module: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise InpformerError(f"--log {extra} needs the {extra} package: pip install 'inpformer[{extra}]'") from None
