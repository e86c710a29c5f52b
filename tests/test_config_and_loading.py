"""Configuration from the environment, and model loading errors that say what to set."""

import pytest

from config import DEFAULT_MODEL_ID, Settings
from errors import ModelLoadError
from model_handler import load_tracker


def test_defaults_without_environment():
    settings = Settings.from_env({})
    assert settings.model_id == DEFAULT_MODEL_ID
    assert settings.redis_host is None and settings.redis_port == 6379
    assert settings.state_ttl_s == 8 * 3600


def test_environment_is_parsed_once_into_settings():
    settings = Settings.from_env({
        "SAM2_CONFIG_OVERRIDES": " ++model.image_size=256   ++model.fill_hole_area=0 ",
        "SAM2_DEVICE": "cpu",
        "CVAT_FUNCTIONS_REDIS_HOST": "cvat_redis_ondisk",
        "CVAT_FUNCTIONS_REDIS_PORT": "6666",
        "SAM2_STATE_TTL_SECONDS": "60",
    })
    assert settings.config_overrides == ("++model.image_size=256", "++model.fill_hole_area=0")
    assert (settings.redis_host, settings.redis_port, settings.state_ttl_s) == ("cvat_redis_ondisk", 6666, 60)


@pytest.mark.parametrize("env, message", [
    ({"SAM2_DEVICE": "tpu"}, "SAM2_DEVICE"),
    ({"SAM2_DEVICE": "cuda:first"}, "SAM2_DEVICE"),
    ({"SAM2_REDIS_TIMEOUT_SECONDS": "nan"}, "SAM2_REDIS_TIMEOUT_SECONDS"),
    ({"SAM2_POLYGON_TOLERANCE": "inf"}, "SAM2_POLYGON_TOLERANCE"),
    ({"SAM2_STATE_TTL_SECONDS": "-5"}, "SAM2_STATE_TTL_SECONDS"),
    ({"CVAT_FUNCTIONS_REDIS_PORT": "redis"}, "CVAT_FUNCTIONS_REDIS_PORT"),
    ({"SAM2_MAX_OBJECTS": "0"}, "SAM2_MAX_OBJECTS"),
])
def test_invalid_settings_are_refused_by_name(env, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env)


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "cuda:3"])
def test_every_documented_device_form_is_accepted(device):
    assert Settings.from_env({"SAM2_DEVICE": device}).device == device


def test_missing_weights_name_the_variables_to_set(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(ModelLoadError) as e:
        load_tracker(Settings(model_id=DEFAULT_MODEL_ID, device="cpu"))
    assert "SAM2_MODEL_ID" in str(e.value) and "SAM2_CHECKPOINT" in str(e.value)


def test_unknown_model_id_lists_the_known_ones():
    with pytest.raises(ModelLoadError, match="facebook/sam2.1-hiera-large"):
        load_tracker(Settings(model_id="facebook/sam9", device="cpu"))


def test_config_without_checkpoint_is_refused():
    with pytest.raises(ModelLoadError, match="SAM2_CONFIG and SAM2_CHECKPOINT"):
        load_tracker(Settings(config="configs/sam2.1/sam2.1_hiera_t.yaml", device="cpu"))


def test_same_weights_give_the_same_fingerprint_and_other_weights_another(settings, tracker, tmp_path):
    from support import make_checkpoint

    other = str(tmp_path / "other.pt")
    make_checkpoint(other, seed=1)
    assert load_tracker(settings).fingerprint == tracker.fingerprint
    assert load_tracker(Settings(**{**settings.__dict__, "checkpoint": other})).fingerprint != tracker.fingerprint
