"""inpformer: INP-Former industrial visual anomaly detection (Luo et al., CVPR 2025).

Public API: `INPFormer` (fit / evaluate / predict / save / load), its result types, the dataset readers,
presets, and the run-directory functions the CLI is a shell over.
"""

from .augment import draw_shots
from .config import PRESETS, Config, make_config
from .data import Sample, find_categories, load_mvtec, read_image
from .datasets import detect_dataset, load_dataset, load_folder, load_realiad, load_visa
from .detector import INPFormer
from .errors import InpformerError
from .results import Evaluation, ScoredImages
from .runs import DataSource, test_run, train_run

__version__ = "0.1.0"
__all__ = [
    "PRESETS",
    "Config",
    "DataSource",
    "Evaluation",
    "INPFormer",
    "InpformerError",
    "Sample",
    "ScoredImages",
    "detect_dataset",
    "draw_shots",
    "find_categories",
    "load_dataset",
    "load_folder",
    "load_mvtec",
    "load_realiad",
    "load_visa",
    "make_config",
    "read_image",
    "test_run",
    "train_run",
]
