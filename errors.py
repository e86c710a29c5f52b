"""The tracker's exceptions, each mapped to the HTTP status a caller should see.

4xx errors are the caller's to fix; 503 means the state store is down and a retry later may work;
anything else escaping to the transport is a bug and becomes a 500.
"""


class TrackerError(Exception):
    """Base class; `status` is the HTTP status the transport answers with."""

    status = 500


class BadRequest(TrackerError):
    """The request is malformed; the message names the field."""

    status = 400


class PayloadTooLarge(TrackerError):
    status = 413


class StateNotFound(TrackerError):
    """The tracking state is unknown or has expired."""

    status = 410


class StateConflict(TrackerError):
    """The state was made by another model or format, or another request already advanced it."""

    status = 409


class StoreUnavailable(TrackerError):
    """The state store cannot be reached or answered too slowly."""

    status = 503


class ModelLoadError(RuntimeError):
    """The model could not be built; raised at start-up, never per request."""
