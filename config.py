"""Every setting the function reads, parsed once from the environment (see the README's table)."""

import dataclasses
import math
import os
import re
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
    # --- state store ---
    redis_host: Optional[str] = None  # unset: embedded in-process store
    redis_port: int = 6379
    redis_password: Optional[str] = None
    redis_timeout_s: float = 5.0  # connect and socket timeout; a slow Redis never hangs a worker
    state_prefix: str = "sam2-tracker:"  # every key starts with this; Kvrocks ignores SELECT
    state_ttl_s: int = 8 * 3600  # CVAT's signed states expire after 8 h, so ours may too
    cache_bytes: int = 512 * 2**20  # per-replica cache of recently used states
    # --- request limits ---
    max_objects: int = 128  # objects per request
    max_image_pixels: int = 7680 * 4320  # 8K frames; bigger images are refused before decoding
    max_body_bytes: int = 128 * 2**20  # matches maxRequestBodySize in function.yaml
    polygon_tolerance: float = 1.0  # px, Douglas-Peucker tolerance for returned polygons

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
            redis_password=text("CVAT_FUNCTIONS_REDIS_PASSWORD"),
            redis_timeout_s=number("SAM2_REDIS_TIMEOUT_SECONDS", 5.0, float),
            state_prefix=text("SAM2_STATE_PREFIX") or "sam2-tracker:",
            state_ttl_s=number("SAM2_STATE_TTL_SECONDS", 8 * 3600),
            cache_bytes=number("SAM2_CACHE_BYTES", 512 * 2**20),
            max_objects=number("SAM2_MAX_OBJECTS", 128),
            max_image_pixels=number("SAM2_MAX_IMAGE_PIXELS", 7680 * 4320),
            max_body_bytes=number("SAM2_MAX_BODY_BYTES", 128 * 2**20),
            polygon_tolerance=number("SAM2_POLYGON_TOLERANCE", 1.0, float),
        )
