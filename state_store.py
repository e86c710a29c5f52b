"""Where tracking sessions live between requests.

A session is a set of named byte fields that expire together. Fields are write-once: a name,
once written, keeps its value until it is deleted or the session expires (the tracker never
rewrites a field; `commit` refuses to). That lets a replica cache fields without asking whether
they changed. Stores know nothing about SAM2: they hold bytes.

`EmbeddedStore` keeps sessions in this process (the default, for one replica); the Redis store
shares them between replicas.
"""

import abc
import threading
import time
from typing import Mapping, Sequence

from errors import StateConflict, StateNotFound


class StateStore(abc.ABC):
    """The seam between the tracker and wherever its sessions are kept."""

    @abc.abstractmethod
    def create(self, session: str, fields: Mapping[str, bytes]) -> None:
        """Store a new session; its lifetime starts now."""

    @abc.abstractmethod
    def read(self, session: str, names: Sequence[str]) -> dict[str, bytes]:
        """Return the named fields that exist and refresh the session's lifetime.

        Raises StateNotFound when the session is unknown or has expired.
        """

    @abc.abstractmethod
    def commit(
        self,
        session: str,
        *,
        guard: tuple[str, bytes],
        put: Mapping[str, bytes],
        delete: Sequence[str] = (),
    ) -> bool:
        """Atomically write `guard` and `put` and delete `delete`, unless `guard`'s field exists.

        Returns True when written, False when the guard field already holds the same value (a
        retry of a request that already committed: nothing is changed). Raises StateConflict when
        it holds another value, and StateNotFound when the session is gone.
        """

    def ping(self) -> None:
        """Raise StoreUnavailable if the store cannot be reached."""

    def close(self) -> None:
        """Release connections."""


class EmbeddedStore(StateStore):
    """Sessions in this process's memory; lost on restart, not shared between replicas."""

    def __init__(self, *, ttl_s: float, clock=time.monotonic):
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, tuple[float, dict[str, bytes]]] = {}  # id -> (expiry, fields)
        self._next_sweep = 0.0

    def _live(self, session: str, now: float) -> dict[str, bytes]:
        entry = self._sessions.get(session)
        if entry is None or entry[0] <= now:
            self._sessions.pop(session, None)
            raise StateNotFound(f"tracking state {session} is unknown or has expired; re-initialize the object")
        self._sessions[session] = (now + self._ttl_s, entry[1])
        return entry[1]

    def _sweep(self, now: float) -> None:
        # Expired sessions are dropped at most once a minute, so memory stays bounded by the TTL.
        if now >= self._next_sweep:
            self._sessions = {k: v for k, v in self._sessions.items() if v[0] > now}
            self._next_sweep = now + 60

    def create(self, session, fields):
        with self._lock:
            now = self._clock()
            self._sweep(now)
            self._sessions[session] = (now + self._ttl_s, dict(fields))

    def read(self, session, names):
        with self._lock:
            fields = self._live(session, self._clock())
            return {name: fields[name] for name in names if name in fields}

    def commit(self, session, *, guard, put, delete=()):
        with self._lock:
            fields = self._live(session, self._clock())
            name, value = guard
            if name in fields:
                if fields[name] == value:
                    return False
                raise StateConflict(
                    f"tracking state {session} was already advanced by another request; re-initialize the object"
                )
            fields[name] = value
            fields.update(put)
            for victim in delete:
                fields.pop(victim, None)
            return True


def make_store(settings) -> StateStore:
    """The Redis store when CVAT_FUNCTIONS_REDIS_HOST is set, else the embedded one."""
    if settings.redis_host:
        from redis_store import RedisStore

        return RedisStore.from_settings(settings)
    return EmbeddedStore(ttl_s=settings.state_ttl_s)
