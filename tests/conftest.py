"""Session fixtures: the random-weight checkpoint, the loaded tracker and the function.

Everything shared with the benchmarks lives in support.py.
"""

import pytest

from support import CONFIG, OVERRIDES, Function, first_masks, make_checkpoint, make_frames, model_env, official_masks

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


@pytest.fixture(scope="session")
def video() -> list:
    """The 20-frame video that the multi-replica tests track the first masks through."""
    return make_frames(20)


@pytest.fixture(scope="session")
def official_video(checkpoint, video) -> list:
    """The official predictor's masks for `video` and the first masks, computed once."""
    return official_masks(checkpoint, video, masks=first_masks())
