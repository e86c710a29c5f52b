"""Session fixtures: the random-weight checkpoint, the loaded tracker and the function.

Everything shared with the benchmarks lives in support.py.
"""

import pytest

from support import CONFIG, OVERRIDES, Function, make_checkpoint, model_env

from config import Settings  # noqa: E402 - support puts the project root on sys.path
from model_handler import load_tracker  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("model") / "sam2_random.pt")
    make_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def settings(checkpoint) -> Settings:
    return Settings(config=CONFIG, checkpoint=checkpoint, config_overrides=OVERRIDES, device="cpu")


@pytest.fixture(scope="session")
def tracker(settings):
    return load_tracker(settings)


@pytest.fixture(scope="session")
def function(checkpoint) -> Function:
    """The function with the embedded store (no CVAT_FUNCTIONS_REDIS_HOST)."""
    env = model_env(checkpoint)
    env["CVAT_FUNCTIONS_REDIS_HOST"] = ""
    return Function(env)
