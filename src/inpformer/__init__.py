"""inpformer: INP-Former industrial visual anomaly detection (Luo et al., CVPR 2025).

Public API: `INPFormer` (fit / evaluate / calibrate / predict / save / load), its result types, the dataset
readers, presets, predictors for checkpoints and ONNX files, and the run-directory functions the CLI is a shell
over.
"""

from .calibration import Calibration, Thresholds
from .config import PRESETS, Config, make_config
from .data.augment import draw_shots
from .data.datasets import detect_dataset, load_dataset, load_folder, load_realiad, load_visa
from .data.images import Sample, find_categories, load_mvtec, read_image
from .deploy import export_model, load_predictor, predict_run
from .detector import INPFormer
from .errors import InpformerError, TrainingStopped
from .inference import Failure, Prediction, Predictor, Region
from .results import Evaluation, ScoredImages
from .runs import DataSource, calibrate_run, test_run, train_run

__version__ = "0.1.0"
__all__ = [
    "PRESETS",
    "Calibration",
    "Config",
    "DataSource",
    "Evaluation",
    "Failure",
    "INPFormer",
    "InpformerError",
    "Prediction",
    "Predictor",
    "Region",
    "Sample",
    "ScoredImages",
    "Thresholds",
    "TrainingStopped",
    "calibrate_run",
    "detect_dataset",
    "draw_shots",
    "export_model",
    "find_categories",
    "load_dataset",
    "load_folder",
    "load_mvtec",
    "load_predictor",
    "load_realiad",
    "load_visa",
    "make_config",
    "predict_run",
    "read_image",
    "test_run",
    "train_run",
]
