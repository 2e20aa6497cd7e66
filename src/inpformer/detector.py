"""The public detector: construct, fit, evaluate, predict, save, load (scikit-learn style)."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import importlib.metadata
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from . import official
from .backbone import Encoder, build_encoder, load_encoder
from .calibration import Calibration, calibrate, change_record
from .config import Config, config_from_dict, make_config
from .data.augment import ExpandedDataset
from .data.geometry import Geometry, Size, format_size, mask_on_map
from .data.images import ImageDataset, Preprocess, Sample, read_image, sample_mask
from .data.tiling import TileDataset, resize_mask
from .errors import InpformerError, first_line
from .files import read_torch_file, write_atomically
from .inference import Prediction, Predictor, Runtime, model_metadata
from .metrics import MetricAccumulator
from .model import INPFormerNet
from .results import Evaluation, ScoredImages
from .runtime import InferenceGraph, TorchRuntime, run_in_batches
from .scoring import AnomalyScorer, top_mean, valid_pixels
from .tracking import Tracker
from .training import Checkpoints, TrainingLog, seed_everything, train

log = logging.getLogger("inpformer")
CHECKPOINT_FORMAT = "inpformer-checkpoint"
CHECKPOINT_VERSION = 2  # 2: a padded image's score is over its own pixels (1: over the whole padded input)


class INPFormer:
    """An INP-Former anomaly detector.

    >>> model = INPFormer(preset="cpu", iterations=300)
    >>> model.fit(load_mvtec("data/tire", "train"))
    >>> print(model.evaluate(load_mvtec("data/tire", "test")).table())
    >>> model.save("tire.pt"); model = INPFormer.load("tire.pt")
    """

    def __init__(self, preset: str = "cpu", **settings):
        self._setup(make_config(preset, **settings))

    @classmethod
    def from_config(cls, config: Config) -> INPFormer:
        detector = cls.__new__(cls)
        detector._setup(config)
        return detector

    def _setup(self, config: Config) -> None:
        self.config = config
        self.categories: list[str] = []
        self.backbone_source: str = ""
        self.encoder_in_checkpoint = False  # imported models: their encoder weights travel in the checkpoint
        self.training_log: TrainingLog | None = None
        self.calibration: Calibration | None = None
        self.created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.net: INPFormerNet | None = None
        # training and `evaluate` use the paper's geometry (resize, centre crop); calibration and every deployed
        # prediction use the whole image (deployment_geometry), so thresholds fit what is deployed
        self.preprocess, self.scorer = self._pipeline(self.config.geometry())
        self.deployment_preprocess, self.deployment_scorer = self._pipeline(self.config.deployment_geometry())

    def _pipeline(self, geometry: Geometry) -> tuple[Preprocess, AnomalyScorer]:
        config = self.config
        return (Preprocess(geometry.image_size, geometry.crop_size, resize_mode=geometry.resize_mode),
                AnomalyScorer(geometry.crop_size, config.map_size, config.blur_kernel, config.blur_sigma,
                              config.top_ratio))

    def _build(self, encoder_weights: dict[str, torch.Tensor] | None = None,
               shared_encoder: Encoder | None = None) -> INPFormerNet:
        """The network, its encoder from `encoder_weights` (keeping `backbone_source`), or `shared_encoder` itself
        (frozen, so several networks can train on one: keeping `backbone_source`), or else from the backbone's
        weight sources."""
        seed_everything(self.config.seed)
        if shared_encoder is not None:
            encoder = shared_encoder
        elif encoder_weights is None:
            encoder, self.backbone_source = load_encoder(self.config.backbone, self.config.crop_size,
                                                         self.config.backbone_weights)
        else:
            encoder = build_encoder(self.config.backbone, self.config.crop_size, encoder_weights,
                                    self.backbone_source, fix="choose the --backbone the model was trained with")
        self.encoder_in_checkpoint = encoder_weights is not None
        return INPFormerNet(encoder, encoder.embed_dim, encoder.num_heads, self.config.num_inps,
                            self.config.decoder_depth)

    @classmethod
    def from_official(cls, path: str | Path, backbone: str | None = None, image_size: int | Size | str | None = None,
                      crop_size: int | Size | str | None = None) -> INPFormer:
        """A detector with the authors' released weights (a `model.pth` of the official INP-Former code, encoder
        included), in the `paper` preset's settings (dinov2reg_vitb14, 448 -> 392) unless given. It has no
        thresholds yet: `calibrate` it before predicting."""
        encoder_weights, weights = official.read_official(path)
        detector = cls.from_config(make_config("paper", backbone=backbone, image_size=image_size,
                                               crop_size=crop_size, num_inps=official.num_inps(weights)))
        detector.backbone_source = f"imported from {path}"
        detector.net = detector._build(encoder_weights)
        official.load_official(detector.net, weights, path)
        detector.net.eval()
        return detector

    def fit(self, samples: Sequence[Sample], augment: bool = False, progress: bool = True,
            extra_good: Sequence[Sample] = (), training_state: str | Path | None = None, checkpoint_every: int = 100,
            resume: bool = False, tracker: Tracker | None = None) -> INPFormer:
        """Trains on the good images among `samples` (defective ones are ignored); with `augment` (few-shot),
        each image is expanded into the paper's 22 fixed variants. A `val_fraction` of the good images of each
        category is held out of fitting and calibrates the decision thresholds. `extra_good` images (e.g. an
        operator's false rejects) are fitted on and never held out, so the held-out split stays that of `samples`.

        With `training_state` (a file), the state of training is saved there every `checkpoint_every` optimizer
        steps (0: never) and when a SIGINT or SIGTERM stops it (fit then raises `TrainingStopped`); `resume` goes on
        from that file, with the same samples and settings, to the weights an uninterrupted fit gives.
        `tracker` (see `inpformer.tracking.open_tracker`) receives the loss and learning rate of every step and
        the calibrated thresholds."""
        good = [s for s in samples if s.label == 0]
        if not good:
            raise InpformerError("no good training images given; fit() needs images of defect-free parts")
        self.categories = sorted({s.category for s in good})
        fitting, held_out = split_validation(good, self.config.val_fraction, self.config.seed)
        fitting += extra_good
        self.net = self._build()
        log.info("training on %d good images of %s (%d held out for calibration)", len(fitting),
                 ", ".join(self.categories), len(held_out))
        tiling = self.config.tiling()
        if augment and tiling:
            raise InpformerError("few-shot expansion and --tile-scale cannot be combined; train on tiles of more "
                                 "good images, or without --tile-scale")
        if tiling:
            dataset = TileDataset(fitting, tiling, self.preprocess)
            log.info("%d tiles of %s pixels (images resized by %g, overlap %g)", len(dataset),
                     format_size(tiling.tile_size), tiling.scale, tiling.overlap)
        else:
            dataset = ExpandedDataset(fitting, self.preprocess) if augment else ImageDataset(fitting, self.preprocess)
        checkpoints = None
        if training_state is not None:
            images = [str(Path(s.path).resolve()) for s in fitting]  # the same however the data were named
            digest = hashlib.sha256("\n".join(images).encode()).hexdigest()[:12]
            checkpoints = Checkpoints(Path(training_state), checkpoint_every, resume, {
                "the list of training images": f"{len(images)} images (sha256 {digest})",
                "few-shot expansion": augment})
        elif resume:
            raise InpformerError("resume=True needs the training_state file of the interrupted fit")
        if tracker is not None:
            tracker.log_params({**self.config.to_dict(), "categories": ",".join(self.categories),
                                "training_images": len(fitting)})
        self.training_log = train(self.net, dataset, self.config, progress=progress, checkpoints=checkpoints,
                                  tracker=tracker)
        source = training_calibration_source(fitting, held_out)
        if not held_out:
            if self.config.val_fraction > 0:
                log.warning("too few good images to hold some out (add images or raise --val-fraction)")
            log.warning("thresholds from %s", source)
        self.calibrate(held_out or fitting, progress=progress, source=source, how="training (INPFormer.fit)")
        if tracker is not None:
            pooled = self.calibration.thresholds[""]
            tracker.log_metrics({"calibration/image_threshold": pooled.image,
                                 "calibration/pixel_threshold": pooled.pixel}, self.training_log.iterations)
        return self

    def calibrate(self, samples: Sequence[Sample], method: str = "false-reject", max_false_reject: float | None = None,
                  progress: bool = False, source: str = "", how: str = "",
                  runtime: Runtime | None = None) -> Calibration:
        """Sets the decision thresholds from images the model was not fitted on: good images only
        ("false-reject": reject at most `max_false_reject` of them) or good and defective ones with masks ("f1").
        `source` says in words which images these are; it is kept with the thresholds, and the change is recorded
        in their history with `how` (e.g. the command line). Minimum defect areas set before are kept. `runtime`
        (an export of this model, e.g. int8) scores the images instead of PyTorch, so the thresholds fit its scores."""
        scored = self.score(samples, with_masks=method == "f1", progress=progress, deployment=True, runtime=runtime)
        labels = np.array([s.label for s in scored.samples])
        rate = self.config.max_false_reject if max_false_reject is None else max_false_reject
        calibration = calibrate([s.category for s in scored.samples], labels, scored.scores, scored.maps,
                                scored.embeddings, scored.masks, method, rate)
        calibration.source = source or f"{len(samples)} images given to calibrate()"
        calibration.history.append(change_record(method, how or "INPFormer.calibrate()", source=calibration.source,
                                                 **({"max_false_reject": rate} if method == "false-reject" else {})))
        if self.calibration is not None:
            calibration.inherit(self.calibration)
        self.calibration = calibration
        pooled = self.calibration.thresholds[""]
        log.info("calibrated (%s) on %d good and %d defective images: image threshold %.5f, pixel threshold %.5f",
                 method, pooled.num_good, pooled.num_defective, pooled.image, pooled.pixel)
        return self.calibration

    def set_thresholds(self, image: float | None = None, pixel: float | None = None, category: str | None = None,
                       min_defect_area: float | None = None, how: str = "") -> dict:
        """Sets the decision thresholds by hand, in raw units (`Prediction.score` and the raw map), and/or the
        minimum defect area (below 1 a fraction of the image area, else pixels; 0 none): for one category, or
        without `category` for all of them. What is not given is kept. The change is recorded with the user, the
        time and `how` (default: this call), and returned."""
        if self.calibration is None:
            raise InpformerError("this model has no calibrated thresholds to adjust; calibrate it on good images "
                                 "first (they set the normalisation scales): inpformer calibrate MODEL.pt --data ROOT")
        given = {"image": image, "pixel": pixel, "category": category, "min_defect_area": min_defect_area}
        call = ", ".join(f"{k}={v!r}" for k, v in given.items() if v is not None)
        return self.calibration.set_by_hand(image, pixel, category, min_defect_area,
                                            how or f"INPFormer.set_thresholds({call})")

    def score(self, samples: Sequence[Sample], batch_size: int = 8, with_masks: bool = False,
              zero_shot: bool = False, progress: bool = False, keep_maps: bool = True,
              metrics: MetricAccumulator | None = None, pixel_metrics: bool = True,
              deployment: bool = False, runtime: Runtime | None = None) -> ScoredImages:
        """Image scores, embeddings and (with `keep_maps`) the anomaly maps at the map shape in float16, as the
        metrics use them; in the evaluation geometry, or the deployment one with `deployment`.
        With `metrics`, every batch is also added to that accumulator (maps and masks too with `with_masks` and
        `pixel_metrics`), so metrics need no maps kept. `runtime` runs instead of the PyTorch graph."""
        preprocess, scorer = ((self.deployment_preprocess, self.deployment_scorer) if deployment else
                              (self.preprocess, self.scorer))
        runtime = runtime or TorchRuntime(self.inference_graph(zero_shot, deployment))
        if self.config.tiling():
            return self._score_tiled(samples, runtime, scorer, with_masks, progress, keep_maps, metrics,
                                     pixel_metrics)
        loader = DataLoader(ImageDataset(list(samples), preprocess, with_masks=with_masks), batch_size=batch_size)
        scores, maps, masks, embeddings = [], [], [], []
        for batch in _maybe_progress(loader, progress):
            output = runtime(batch["image"].numpy(), batch["valid"].numpy())
            mask = None
            if with_masks:
                mask = mask_on_map(batch["mask"], scorer.map_shape).numpy()
                masks.append(mask)
            if metrics is not None:
                pixels = {}
                if with_masks and pixel_metrics:
                    pixels = {"masks": mask, "maps": output.maps,
                              "valid": valid_pixels(batch["valid"], scorer.map_shape).numpy()}
                metrics.add(batch["label"].numpy(), output.scores, **pixels)
            scores.append(output.scores)
            embeddings.append(output.embeddings)
            if keep_maps:  # float16: half the memory, and exactly the values the metric accumulator uses
                maps.append(output.maps.astype(np.float16))
        return ScoredImages(list(samples), np.concatenate(scores), np.concatenate(maps) if keep_maps else None,
                            np.concatenate(masks) if with_masks and keep_maps else None, np.concatenate(embeddings))

    def _score_tiled(self, samples: Sequence[Sample], runtime: Runtime, scorer: AnomalyScorer,
                     with_masks: bool, progress: bool, keep_maps: bool, metrics: MetricAccumulator | None,
                     pixel_metrics: bool) -> ScoredImages:
        """`score` for a tiled model, one image at a time: its tiles' maps are stitched, and the score, the masks
        and the metrics are taken on the stitched map (each image's own size)."""
        tiling = self.config.tiling()
        scores, maps, masks, embeddings = [], [], [], []
        for sample in _maybe_progress(samples, progress):
            image = read_image(sample.path)
            tiles = np.stack([self.preprocess.normalize(view).numpy() for view in tiling.views(image)])
            output = run_in_batches(runtime, tiles, tiling.valid_boxes(image.shape))
            stitched = tiling.stitch(output.maps, image.shape)
            score = top_mean(torch.from_numpy(stitched)[None], scorer.top_ratio).numpy()
            mask = None
            if with_masks:
                truth = sample_mask(sample, image.shape[:2])
                mask = (np.zeros(stitched.shape, bool) if truth is None else resize_mask(truth, stitched.shape))
                masks.append(mask.astype(np.uint8))
            if metrics is not None:
                pixels = {"masks": mask[None], "maps": stitched[None]} if with_masks and pixel_metrics else {}
                metrics.add(np.array([sample.label]), score, **pixels)
            scores.append(score)
            embeddings.append(F.normalize(torch.from_numpy(output.embeddings).mean(0), dim=0).numpy()[None])
            if keep_maps:
                maps.append(stitched.astype(np.float16))
        return ScoredImages(list(samples), np.concatenate(scores), maps if keep_maps else None,
                            masks if with_masks and keep_maps else None, np.concatenate(embeddings))

    def evaluate(self, samples: Sequence[Sample], zero_shot: bool = False, progress: bool = True,
                 keep_maps: bool = False) -> Evaluation:
        """Per-category metrics on labelled test samples (pixel metrics when masks exist), streamed: a category's
        maps are folded into its metrics batch by batch and dropped, unless `keep_maps` (for reports, maps.npz)."""
        by_category: dict[str, list[Sample]] = {}
        for sample in samples:
            by_category.setdefault(sample.category, []).append(sample)
        metrics, scored = {}, []
        for category, items in by_category.items():
            has_masks = any(s.label == 1 for s in items) and all(
                s.mask_path is not None for s in items if s.label == 1)
            accumulator = MetricAccumulator()
            scored.append(self.score(items, with_masks=True, zero_shot=zero_shot, progress=progress,
                                     keep_maps=keep_maps, metrics=accumulator, pixel_metrics=has_masks))
            metrics[category] = accumulator.compute()
        return Evaluation(metrics, scored)

    def predict(self, images: Sequence[str | Path | np.ndarray] | str | Path | np.ndarray,
                category: str | None = None) -> Prediction | list[Prediction]:
        """The verdict on one image (path or RGB uint8 array) or a list of them: score, normalised score, decision,
        anomaly map and defect mask at the image's resolution. Unreadable files raise InpformerError."""
        single = isinstance(images, (str, Path, np.ndarray))
        items = [images] if single else list(images)
        arrays = [read_image(i) if isinstance(i, (str, Path)) else i for i in items]
        sources = [str(i) if isinstance(i, (str, Path)) else "<array>" for i in items]
        predictions = self.predictor().predict(arrays, sources, category)
        return predictions[0] if single else predictions

    def predictor(self) -> Predictor:
        """A `Predictor` running this model with PyTorch."""
        return Predictor(TorchRuntime(self.inference_graph()), self.metadata())

    def inference_graph(self, zero_shot: bool = False, deployment: bool = True) -> InferenceGraph:
        """The network and scorer as one module (what the PyTorch runtime runs and the ONNX export traces), for
        the deployment geometry (the whole image) or, with `deployment=False`, the evaluation one."""
        threshold = self.calibration.thresholds[""].image if self.calibration else float("inf")
        net, scorer = self._require_net(), self.scorer
        if deployment:
            net = net.with_encoder(net.encoder.resized(self.config.deployment_geometry().crop_size))
            scorer = self.deployment_scorer
        return InferenceGraph(net, scorer, threshold, zero_shot).eval()

    def metadata(self) -> dict:
        """Everything besides the weights a predictor needs, plus provenance (stored in exported files)."""
        return model_metadata(self.config.to_dict(), self.config.deployment_geometry(), self.categories,
                              self.calibration, backbone_source=self.backbone_source, created=self.created,
                              versions=_versions())

    def save(self, path: str | Path) -> Path:
        """Writes one self-describing checkpoint file, atomically (a crash never leaves a half-written file)."""
        net = self._require_net()
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "backbone": {"name": self.config.backbone, "source": self.backbone_source},
            "categories": self.categories,
            "calibration": self.calibration.to_dict() if self.calibration else None,
            "state_dict": net.trainable_state_dict(),
            "encoder_state_dict": net.encoder.weights() if self.encoder_in_checkpoint else None,
            "training": asdict(self.training_log) if self.training_log else {},
            "versions": _versions(),
            "created": self.created,
        }
        return write_atomically(path, lambda tmp: torch.save(checkpoint, tmp))

    @classmethod
    def load(cls, path: str | Path) -> INPFormer:
        """Rebuilds a detector from `save`'s file (the backbone weights come from the file itself when it carries
        them, as imported models do, else from their recorded source)."""
        path = Path(path)
        checkpoint = read_torch_file(path, "inpformer checkpoint", "retrain or pass the model file written by training")
        if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise InpformerError(f"{path}: not an inpformer checkpoint; pass the model file written by training")
        try:
            detector = cls._from_checkpoint(checkpoint)
        except KeyError as error:
            raise InpformerError(f"{path}: malformed checkpoint (no {error} entry); retrain or pass the model file "
                                 "written by training") from None
        except (TypeError, ValueError, AttributeError, RuntimeError, InpformerError) as error:
            raise InpformerError(f"{path}: malformed checkpoint ({first_line(error)}); retrain or pass the model file "
                                 "written by training") from None
        if checkpoint.get("format_version") == 1 and detector.config.resize_mode == "pad" and detector.calibration:
            log.warning("%s: its thresholds were set when a padded image's score was taken over the whole input; "
                        "scores are now over the image's own pixels: recalibrate with `inpformer calibrate`", path)
        return detector

    @classmethod
    def _from_checkpoint(cls, checkpoint: dict) -> INPFormer:
        if not isinstance(checkpoint["config"], dict) or not isinstance(checkpoint["state_dict"], dict):
            raise TypeError("'config' and 'state_dict' must be dictionaries")
        detector = cls.from_config(config_from_dict(checkpoint["config"]))
        if not isinstance(checkpoint["categories"], list) or not all(isinstance(c, str)
                                                                    for c in checkpoint["categories"]):
            raise TypeError("'categories' must be a list of names")
        detector.categories = list(checkpoint["categories"])
        detector.calibration = (Calibration.from_dict(checkpoint["calibration"])
                                if checkpoint.get("calibration") else None)
        detector.created = str(checkpoint.get("created", ""))
        training = checkpoint.get("training") or {}
        detector.training_log = TrainingLog(**training) if training else None
        encoder_weights = checkpoint.get("encoder_state_dict")
        if encoder_weights is not None:
            if not isinstance(encoder_weights, dict):
                raise TypeError("'encoder_state_dict' must be a dictionary")
            detector.backbone_source = str(checkpoint["backbone"]["source"])
        detector.net = detector._build(encoder_weights)
        missing, unexpected = detector.net.load_state_dict(checkpoint["state_dict"], strict=False)
        missing = [k for k in missing if not k.startswith("encoder.")]
        if missing or unexpected:
            raise ValueError(f"it does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}; it was "
                             "written by an incompatible version")
        detector.net.eval()
        return detector

    def _require_net(self) -> INPFormerNet:
        if self.net is None:
            raise InpformerError("the detector is not trained; call fit() or INPFormer.load() first")
        return self.net


def training_calibration_source(fitting: Sequence[Sample], held_out: Sequence[Sample]) -> str:
    """In words, which training images set the thresholds: the held-out ones or, without any, the fitted ones."""
    if held_out:
        return f"{len(held_out)} good training images held out of fitting (--val-fraction)"
    return (f"the {len(fitting)} good training images the model was fitted on: their scores are biased low, so new "
            "good parts may be rejected more often than --max-false-reject; recalibrate on unseen good images with "
            "`inpformer calibrate RUN_DIR --data ...`")


def split_validation(good: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(fitting, held out): a seeded `fraction` of each category's good images is held out (none if a category
    has too few images to spare one)."""
    fitting, held_out = [], []
    for category in sorted({s.category for s in good}):
        items = [s for s in good if s.category == category]
        order = np.random.default_rng(seed).permutation(len(items))
        count = int(len(items) * fraction)
        held_out += [items[i] for i in sorted(order[:count])]
        fitting += [items[i] for i in sorted(order[count:])]
    return fitting, held_out


def _maybe_progress(items: Iterable, progress: bool):
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="scoring")


@functools.cache  # package metadata lookups cost milliseconds, and every predict() call records the versions
def _versions() -> dict[str, str]:
    names = ("inpformer", "torch", "timm", "numpy")
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions
