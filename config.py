"""Every setting the function reads, parsed once from the environment (see the README's table)."""

import dataclasses
import math
import os
import re
import urllib.parse
from typing import Mapping, Optional

DEFAULT_MODEL_ID = "facebook/sam2.1-hiera-tiny"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    # --- model ---
    model_id: str = DEFAULT_MODEL_ID  # Hugging Face id, used unless config + checkpoint are given
    config: Optional[str] = None  # sam2 config name, e.g. configs/sam2.1/sam2.1_hiera_t.yaml
    checkpoint: Optional[str] = None  # local file holding {"model": state_dict}
    config_overrides: tuple[str, ...] = ()  # extra hydra overrides
    device: Optional[str] = None  # "cpu" or "cuda"; None picks cuda when available
    # --- state store (the README's "Connecting to Redis" says how these combine) ---
    redis_host: Optional[str] = None  # unset, with no URL and no Sentinels: embedded in-process store
    redis_port: int = 6379
    redis_url: Optional[str] = dataclasses.field(default=None, repr=False)  # may hold a password
    redis_username: Optional[str] = None  # sent only when set: Kvrocks 2.7 refuses AUTH user pass
    redis_password: Optional[str] = dataclasses.field(default=None, repr=False)  # never in logs
    redis_tls_ca_file: Optional[str] = None
    redis_tls_cert_file: Optional[str] = None
    redis_tls_key_file: Optional[str] = None
    redis_sentinels: tuple[tuple[str, int], ...] = ()  # (host, port) of each Sentinel
    redis_sentinel_master: str = "mymaster"
    redis_cluster: bool = False
    redis_timeout_s: float = 5.0  # connect and socket timeout; a slow Redis never hangs a worker
    state_prefix: str = "sam2-tracker:"  # every key starts with this; Kvrocks ignores SELECT
    state_ttl_s: int = 8 * 3600  # CVAT's signed states expire after 8 h, so ours may too
    cache_bytes: int = 512 * 2**20  # per-replica cache of recently used states
    # --- request limits ---
    max_objects: int = 128  # objects per request
    max_image_pixels: int = 7680 * 4320  # 8K frames; bigger images are refused before decoding
    max_body_bytes: int = 128 * 2**20  # matches maxRequestBodySize in function.yaml
    polygon_tolerance: float = 1.0  # px, Douglas-Peucker tolerance for returned polygons

    @property
    def uses_redis(self) -> bool:
        return bool(self.redis_host or self.redis_url or self.redis_sentinels)

    @property
    def redis_tls(self) -> bool:
        tls_files = (self.redis_tls_ca_file, self.redis_tls_cert_file, self.redis_tls_key_file)
        return any(tls_files) or (self.redis_url or "").startswith("rediss://")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Settings":
        def text(name: str) -> Optional[str]:
            value = env.get(name, "").strip()
            return value or None

        def number(name: str, default, kind=int):
            value = text(name)
            if value is None:
                return default
            try:
                parsed = kind(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} is not a valid {kind.__name__}") from None
            if not math.isfinite(parsed) or parsed <= 0:  # "nan" and "inf" parse as floats
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
            return parsed

        def readable(name: str) -> Optional[str]:
            path = text(name)
            if path is not None:
                try:
                    with open(path, "rb"):
                        pass
                except OSError as e:
                    raise ValueError(f"{name}={path!r} cannot be read ({e.strerror})") from None
            return path

        device = text("SAM2_DEVICE")
        if device is not None and not re.fullmatch(r"cpu|cuda(:[0-9]+)?", device):
            raise ValueError(f"SAM2_DEVICE must be 'cpu', 'cuda' or 'cuda:N' (N a GPU index), got {device!r}")
        return cls(
            model_id=text("SAM2_MODEL_ID") or DEFAULT_MODEL_ID,
            config=text("SAM2_CONFIG"),
            checkpoint=text("SAM2_CHECKPOINT"),
            config_overrides=tuple((text("SAM2_CONFIG_OVERRIDES") or "").split()),
            device=device,
            redis_host=text("CVAT_FUNCTIONS_REDIS_HOST"),
            redis_port=number("CVAT_FUNCTIONS_REDIS_PORT", 6379),
            redis_url=text("SAM2_REDIS_URL"),
            redis_username=text("SAM2_REDIS_USERNAME"),
            redis_password=_password(env, readable("SAM2_REDIS_PASSWORD_FILE")),
            redis_tls_ca_file=readable("SAM2_REDIS_TLS_CA_FILE"),
            redis_tls_cert_file=readable("SAM2_REDIS_TLS_CERT_FILE"),
            redis_tls_key_file=readable("SAM2_REDIS_TLS_KEY_FILE"),
            redis_sentinels=_sentinels(text("SAM2_REDIS_SENTINELS")),
            redis_sentinel_master=text("SAM2_REDIS_SENTINEL_MASTER") or "mymaster",
            redis_cluster=_flag("SAM2_REDIS_CLUSTER", text("SAM2_REDIS_CLUSTER")),
            redis_timeout_s=number("SAM2_REDIS_TIMEOUT_SECONDS", 5.0, float),
            state_prefix=text("SAM2_STATE_PREFIX") or "sam2-tracker:",
            state_ttl_s=number("SAM2_STATE_TTL_SECONDS", 8 * 3600),
            cache_bytes=number("SAM2_CACHE_BYTES", 512 * 2**20),
            max_objects=number("SAM2_MAX_OBJECTS", 128),
            max_image_pixels=number("SAM2_MAX_IMAGE_PIXELS", 7680 * 4320),
            max_body_bytes=number("SAM2_MAX_BODY_BYTES", 128 * 2**20),
            polygon_tolerance=number("SAM2_POLYGON_TOLERANCE", 1.0, float),
        )._checked()

    def _checked(self) -> "Settings":
        """Refuse combinations of Redis settings that cannot mean what the operator wants."""
        try:
            url = urllib.parse.urlsplit(self.redis_url or "")
            url.hostname, url.port  # noqa: B018 - parses them
        except ValueError:  # its message may quote the URL, password included
            raise ValueError(
                "SAM2_REDIS_URL cannot be parsed; characters such as / ? # @ [ ] % in a password must be "
                "percent-encoded (or use SAM2_REDIS_PASSWORD_FILE)"
            ) from None
        if self.redis_url:
            _check_url(url)
        if not 0 < self.redis_port < 65536:
            raise ValueError(f"CVAT_FUNCTIONS_REDIS_PORT must be a port number, got {self.redis_port}")
        if url.password and self.redis_password:
            raise ValueError("the Redis password is set twice, in SAM2_REDIS_URL and in a password variable; keep one")
        if url.username and self.redis_username:
            raise ValueError("the Redis user is set twice, in SAM2_REDIS_URL and in SAM2_REDIS_USERNAME; keep one")
        if self.redis_sentinels and self.redis_cluster:
            raise ValueError("SAM2_REDIS_SENTINELS and SAM2_REDIS_CLUSTER exclude each other; set one")
        if self.redis_sentinels and self.redis_url:
            raise ValueError("with SAM2_REDIS_SENTINELS the Sentinels name the master; unset SAM2_REDIS_URL")
        if url.scheme == "unix" and (self.redis_cluster or self.redis_tls):
            raise ValueError("a unix:// SAM2_REDIS_URL has no TLS and no Cluster; unset those settings")
        if self.redis_cluster and not (self.redis_host or self.redis_url):
            raise ValueError("SAM2_REDIS_CLUSTER needs a node to start from: set SAM2_REDIS_URL")
        if self.redis_tls_key_file and not self.redis_tls_cert_file:
            raise ValueError("SAM2_REDIS_TLS_KEY_FILE needs SAM2_REDIS_TLS_CERT_FILE, the certificate it goes with")
        return self


def _check_url(url: urllib.parse.SplitResult) -> None:
    """A URL that says where the store is, and nothing else. Messages never quote it: it may hold
    a password."""
    if url.scheme not in ("redis", "rediss", "unix"):
        raise ValueError("SAM2_REDIS_URL must start with redis://, rediss:// or unix://")
    # redis-py would let query options (protocol, ssl_cert_reqs, ...) override what the function
    # pins, and a database number is a SELECT, which Kvrocks ignores and an ACL user may lack.
    if url.query or url.fragment:
        raise ValueError("SAM2_REDIS_URL takes no ?options: the variables in the README set everything")
    if url.scheme != "unix" and url.path not in ("", "/", "/0"):
        raise ValueError("SAM2_REDIS_URL takes no database number: use SAM2_STATE_PREFIX to keep deployments apart")
    if url.scheme != "unix" and not url.hostname:
        raise ValueError("SAM2_REDIS_URL names no host")


def _password(env: Mapping[str, str], path: Optional[str]) -> Optional[str]:
    """The password file's content (one trailing newline dropped) wins over the variable."""
    if path is None:
        return env.get("CVAT_FUNCTIONS_REDIS_PASSWORD", "").strip() or None
    try:
        with open(path, encoding="utf-8") as f:
            password = f.read().removesuffix("\n").removesuffix("\r")
    except UnicodeDecodeError:  # its message would quote a byte of the password
        raise ValueError(f"SAM2_REDIS_PASSWORD_FILE={path!r} is not UTF-8 text") from None
    if not password:
        raise ValueError(f"SAM2_REDIS_PASSWORD_FILE={path!r} is empty")
    return password


def _sentinels(value: Optional[str]) -> tuple[tuple[str, int], ...]:
    """"host:port, host:port" (an IPv6 host in brackets) into pairs."""
    if value is None:
        return ()
    pairs = []
    for item in value.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"SAM2_REDIS_SENTINELS must be comma-separated host:port pairs, got {value!r}")
        pairs.append((host.strip("[]"), int(port)))
    return tuple(pairs)


def _flag(name: str, value: Optional[str]) -> bool:
    if value is None or value.lower() in ("false", "0", "no"):
        return False
    if value.lower() in ("true", "1", "yes"):
        return True
    raise ValueError(f"{name} must be true or false, got {value!r}")
