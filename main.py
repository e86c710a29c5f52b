"""Nuclio entry point: transport only (parse, validate, call, encode).

`init_context` loads the model and opens the state store once per worker; `handler` answers
CVAT's tracker requests (see protocol.py) and GET health checks. Every error leaves as JSON
{"error": ...} with a status: 4xx for the caller's mistakes, 409/410 for states to re-initialize,
503 when the state store is down, 500 (traceback logged) for bugs.
"""

import json
import traceback

from config import Settings
from errors import TrackerError
from model_handler import load_tracker
from protocol import parse_body, parse_request
from state_store import make_store
from tracking import TrackingService


def init_context(context) -> None:
    settings = Settings.from_env()
    tracker = load_tracker(settings)
    store = make_store(settings)
    context.user_data.settings = settings
    context.user_data.service = TrackingService(tracker, store, polygon_tolerance=settings.polygon_tolerance)
    context.logger.info_with(
        "SAM2 tracker ready",
        model=settings.config or settings.model_id,
        device=str(tracker.device),
        image_size=tracker.image_size,
        store=type(store).__name__,
    )


def _respond(context, status: int, body: dict):
    return context.Response(
        body=json.dumps(body, separators=(",", ":")),
        headers={},
        content_type="application/json",
        status_code=status,
    )


def handler(context, event):
    service: TrackingService = context.user_data.service
    settings: Settings = context.user_data.settings
    try:
        if (event.method or "POST").upper() == "GET":
            service.store.ping()
            return _respond(context, 200, {"status": "ok", "model": service.tracker.fingerprint})
        payload = parse_body(event.body, max_bytes=settings.max_body_bytes)
        request = parse_request(payload, settings)
        body = service.track(image=request.image, frame_digest=request.frame_digest, objects=request.objects)
        return _respond(context, 200, body)
    except TrackerError as e:
        if e.status >= 500:
            context.logger.warn_with("request failed on the server side", error=f"{type(e).__name__}: {e}")
        return _respond(context, e.status, {"error": str(e)})
    except Exception as e:  # a bug: answer 500 with JSON, never Nuclio's plain-text traceback
        context.logger.error_with("unhandled error", error=repr(e), traceback=traceback.format_exc())
        return _respond(context, 500, {"error": f"internal error ({type(e).__name__}); see the function's log"})
