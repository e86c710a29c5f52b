"""Nuclio entry point: transport only (parse, validate, call, encode).

`init_context` loads the model and opens the state store once per worker; `handler` answers
CVAT's tracker requests (see protocol.py) and GET health checks. Every error leaves as JSON
{"error": ...} with a status: 4xx for the caller's mistakes, 409/410 for states to re-initialize,
503 when the state store is down, 500 (traceback logged) for bugs.

Every tracking request logs one line: what it did and where its time went (see `_log_request`).
"""

import json
import time
import traceback

from config import Settings
from errors import ModelLoadError, StoreUnavailable, TrackerError
from model_handler import load_tracker
from protocol import parse_body, parse_request
from redis_client import StoreMisconfigured, misconfiguration, tls_hint
from state_store import make_store
from tracking import RequestStats, TrackingService

# RequestStats' phases, logged as <phase>_ms.
PHASES = ("decode", "encoder", "model", "codec", "store_read", "store_write", "shapes")


def init_context(context) -> None:
    try:
        settings = Settings.from_env()
        store = make_store(settings)
        _check_store(context, store, settings)  # before the model: a wrong setting fails fast
        tracker = load_tracker(settings)
    except (ValueError, ModelLoadError, StoreMisconfigured) as e:
        # What to fix, in one line; SystemExit passes Nuclio's wrapper without a traceback.
        context.logger.error_with("could not start the tracker", error=str(e))
        raise SystemExit(1) from None
    context.user_data.settings = settings
    context.user_data.service = TrackingService(tracker, store, polygon_tolerance=settings.polygon_tolerance)
    context.logger.info_with(
        "SAM2 tracker ready",
        model=settings.config or settings.model_id,
        device=str(tracker.device),
        image_size=tracker.image_size,
        store=store.kind,
    )


def _check_store(context, store, settings) -> None:
    """Refuse settings that cannot work; an unreachable store only warns, since it may come back
    (requests answer 503 until then) and a restart loop would not help."""
    try:
        store.check()
    except StoreUnavailable as e:
        problem = misconfiguration(e.__cause__, settings)
        if problem is not None:
            raise StoreMisconfigured(f"state store ({store.where}): {problem}") from None
        context.logger.warn_with("state store unreachable at start-up; requests answer 503 until it is back",
                                 error=str(e), hint=tls_hint(e.__cause__, settings))


def _respond(context, status: int, body: dict):
    return context.Response(
        body=json.dumps(body, separators=(",", ":")),
        headers={},
        content_type="application/json",
        status_code=status,
    )


def handler(context, event):
    started = time.perf_counter()
    service: TrackingService = context.user_data.service
    settings: Settings = context.user_data.settings
    health = (event.method or "POST").upper() == "GET"
    stats = RequestStats()
    try:
        if health:
            return _respond(context, 200, _health(service))
        payload = parse_body(event.body, max_bytes=settings.max_body_bytes)
        request = parse_request(payload, settings, stats)
        body = service.track(image=request.image, frame_digest=request.frame_digest, objects=request.objects,
                             stats=stats)
    except TrackerError as e:
        response = _respond(context, e.status, {"error": str(e)})
        if health:
            context.logger.warn_with("health check failed", error=f"{type(e).__name__}: {e}")
        else:
            _log_request(context, service, stats, started, status=e.status, error=e)
        return response
    except Exception as e:  # a bug: answer 500 with JSON, never Nuclio's plain-text traceback
        trace = traceback.format_exc()
        response = _respond(context, 500, {"error": f"internal error ({type(e).__name__}); see the function's log"})
        _log_request(context, service, stats, started, status=500, error=e, trace=trace)
        return response
    # Outside the try: the states are written, so nothing after this may turn the answer into a 500.
    response = _respond(context, 200, body)
    _log_request(context, service, stats, started, status=200)
    return response


def _health(service: TrackingService) -> dict:
    """Up when the model is loaded and the store answers; with the store's round-trip time."""
    start = time.perf_counter()
    service.store.ping()
    rtt = time.perf_counter() - start
    return {"status": "ok", "model": service.tracker.fingerprint, "store": service.store.kind,
            "store_rtt_ms": _ms(rtt)}


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _log_request(context, service, stats: RequestStats, started: float, *, status: int, error=None, trace=None):
    """One line per tracking request: counts, frame size, phase times, store kind, status.

    Never the image, shapes or state ids: a refused request (4xx) logs its error's type only,
    since some messages name a state. Server-side failures keep their message, as a warning, and
    bugs their traceback, as an error."""
    fields = {
        "status": status,
        "objects_new": stats.new,
        "objects_continued": stats.continued,
        "objects_replayed": stats.replayed,
        "width": stats.width,
        "height": stats.height,
        **{f"{phase}_ms": _ms(getattr(stats, phase)) for phase in PHASES},
        "total_ms": _ms(time.perf_counter() - started),
        "store": service.store.kind,
    }
    if status < 400:
        context.logger.info_with("tracked", **fields)
    elif status < 500:
        context.logger.info_with("tracking request refused", error=type(error).__name__, **fields)
    elif trace is None:
        context.logger.warn_with("request failed on the server side", error=f"{type(error).__name__}: {error}",
                                 **fields)
    else:
        context.logger.error_with("unhandled error", error=repr(error), traceback=trace, **fields)
