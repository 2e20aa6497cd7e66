"""inpformer: INP-Former industrial visual anomaly detection (Luo et al., CVPR 2025).

Public API: `INPFormer` (fit / evaluate / predict / save / load), its result types, the dataset reader
`load_mvtec`, presets, and run-directory helpers used by the CLI.
"""

from .config import PRESETS, Config, make_config
from .data import Sample, find_categories, load_mvtec, read_image
from .detector import Evaluation, INPFormer, ScoredImages
from .errors import InpformerError
from .runs import test_run, train_run

__version__ = "0.1.0"
__all__ = [
    "PRESETS",
    "Config",
    "Evaluation",
    "INPFormer",
    "InpformerError",
    "Sample",
    "ScoredImages",
    "find_categories",
    "load_mvtec",
    "make_config",
    "read_image",
    "test_run",
    "train_run",
]
