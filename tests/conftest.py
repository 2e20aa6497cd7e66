import sys
from pathlib import Path

import pytest

# `synthetic` (the generated-dataset helpers) lives beside the tests.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Backbone conversions go to a per-session cache unless the user points INPFORMER_CACHE elsewhere."""
    import os

    if "INPFORMER_CACHE" not in os.environ:
        os.environ["INPFORMER_CACHE"] = str(tmp_path_factory.mktemp("inpformer-cache"))
    yield
