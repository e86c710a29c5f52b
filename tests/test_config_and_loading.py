"""Configuration from the environment, and model loading errors that say what to set."""

import pathlib
import re

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


@pytest.mark.parametrize("env, message", [
    ({"SAM2_REDIS_URL": "http://cache:6379"}, "SAM2_REDIS_URL must start with"),
    ({"SAM2_REDIS_URL": "redis://:pw@cache:6379", "CVAT_FUNCTIONS_REDIS_PASSWORD": "pw"}, "password is set twice"),
    ({"SAM2_REDIS_URL": "redis://me@cache:6379", "SAM2_REDIS_USERNAME": "me"}, "user is set twice"),
    ({"SAM2_REDIS_SENTINELS": "s:26379", "SAM2_REDIS_CLUSTER": "true"}, "exclude each other"),
    ({"SAM2_REDIS_SENTINELS": "s:26379", "SAM2_REDIS_URL": "redis://cache"}, "unset SAM2_REDIS_URL"),
    ({"SAM2_REDIS_URL": "unix:///run/redis.sock", "SAM2_REDIS_CLUSTER": "true"}, "unix://"),
    ({"SAM2_REDIS_CLUSTER": "true"}, "needs a node to start from"),
    ({"SAM2_REDIS_CLUSTER": "maybe"}, "SAM2_REDIS_CLUSTER must be true or false"),
    ({"SAM2_REDIS_SENTINELS": "s1:26379,s2"}, "SAM2_REDIS_SENTINELS must be"),
    ({"SAM2_REDIS_SENTINELS": "s1:99999"}, "SAM2_REDIS_SENTINELS must be"),
    ({"SAM2_REDIS_PASSWORD_FILE": "/nonexistent/secret"}, "SAM2_REDIS_PASSWORD_FILE.*cannot be read"),
    ({"SAM2_REDIS_TLS_CERT_FILE": "/nonexistent/cert.pem"}, "SAM2_REDIS_TLS_CERT_FILE.*cannot be read"),
    ({"SAM2_REDIS_URL": "rediss://cache:6380?ssl_cert_reqs=none"}, "takes no [?]options"),
    ({"SAM2_REDIS_URL": "redis://cache:6379?protocol=3"}, "takes no [?]options"),
    ({"SAM2_REDIS_URL": "redis://cache:6379/3"}, "takes no database number"),
    ({"SAM2_REDIS_URL": "unix:///run/redis.sock", "SAM2_REDIS_TLS_CA_FILE": __file__}, "no TLS"),
    ({"CVAT_FUNCTIONS_REDIS_PORT": "70000"}, "CVAT_FUNCTIONS_REDIS_PORT must be a port number"),
])
def test_redis_settings_that_cannot_work_are_refused_by_name(env, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env)


def test_a_tls_key_needs_its_certificate(tmp_path):
    key = tmp_path / "client.key"
    key.write_text("key")
    with pytest.raises(ValueError, match="SAM2_REDIS_TLS_KEY_FILE needs SAM2_REDIS_TLS_CERT_FILE"):
        Settings.from_env({"CVAT_FUNCTIONS_REDIS_HOST": "cache", "SAM2_REDIS_TLS_KEY_FILE": str(key)})


def test_redis_settings_are_parsed(tmp_path):
    secret = tmp_path / "password"
    secret.write_text("p@ss word\n")
    settings = Settings.from_env({
        "SAM2_REDIS_SENTINELS": " s1:26379, [fd00::1]:26380 ",
        "SAM2_REDIS_PASSWORD_FILE": str(secret),
        "CVAT_FUNCTIONS_REDIS_PASSWORD": "loses to the file",
        "SAM2_REDIS_USERNAME": "tracker",
    })
    assert settings.redis_sentinels == (("s1", 26379), ("fd00::1", 26380))
    assert settings.redis_sentinel_master == "mymaster"
    assert settings.redis_password == "p@ss word"  # one trailing newline dropped, nothing else
    assert settings.uses_redis and not settings.redis_tls and not settings.redis_cluster
    assert "p@ss" not in repr(settings)  # settings may be logged; the password never is
    assert Settings.from_env({"SAM2_REDIS_URL": "rediss://cache:6380"}).redis_tls
    assert Settings.from_env({"SAM2_REDIS_URL": "redis://a:1", "SAM2_REDIS_CLUSTER": "True"}).redis_cluster
    assert not Settings.from_env({}).uses_redis


def test_every_variable_config_reads_has_a_row_in_a_readme_table():
    root = pathlib.Path(__file__).resolve().parent.parent
    read = set(re.findall(r'"((?:SAM2|CVAT_FUNCTIONS)_[A-Z0-9_]+)"', (root / "config.py").read_text()))
    rows = [line for line in (root / "README.md").read_text().splitlines() if line.startswith("| `")]
    documented = {name for row in rows for name in re.findall(r"`([A-Z0-9_]+)`", row.split(" | ")[0])}
    assert len(read) > 20 and read <= documented, sorted(read - documented)


def test_a_password_file_that_is_not_text_is_refused_without_quoting_it(tmp_path):
    secret = tmp_path / "password"
    secret.write_bytes(b"p\xffSECRET")
    with pytest.raises(ValueError, match="SAM2_REDIS_PASSWORD_FILE.*not UTF-8") as refused:
        Settings.from_env({"SAM2_REDIS_PASSWORD_FILE": str(secret)})
    assert "SECRET" not in str(refused.value) and "xff" not in str(refused.value)


@pytest.mark.parametrize("url", [
    "redis://:Ab3/xYz9SECRET@cache", "redis://:Ab3#SECRET@cache:6379", "redis://u:SECRET@cache:6379/9?a=b",
    "redis://:pa[SECRET]x@cache:6379", "redis://:[SECRET@cache",
])
def test_a_malformed_url_is_refused_without_quoting_its_password(url):
    with pytest.raises(ValueError, match="SAM2_REDIS_URL") as refused:
        Settings.from_env({"SAM2_REDIS_URL": url})
    assert "SECRET" not in str(refused.value) and "Ab3" not in str(refused.value)
    assert "SECRET" not in repr(Settings.from_env({"SAM2_REDIS_URL": "redis://u:SECRET@cache:6379"}))
