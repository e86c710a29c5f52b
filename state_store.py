"""Where tracking sessions live between requests.

A session is a set of named byte fields that expire together. Fields are write-once: a name,
once written, keeps its value until it is deleted or the session expires (the tracker never
rewrites a field; `commit` refuses to). That lets a replica cache fields without asking whether
they changed. Stores know nothing about SAM2: they hold bytes.

`EmbeddedStore` keeps sessions in this process (the default, for one replica); `RedisStore`
shares them between replicas through Redis or Kvrocks.
"""

import abc
import collections
import re
import secrets
import threading
import time
from typing import Mapping, Optional, Sequence

import redis
from redis.exceptions import RedisClusterException
from redis.sentinel import MasterNotFoundError

import redis_client
from errors import StateConflict, StateNotFound, StoreUnavailable
from redis_client import reason


class StateStore(abc.ABC):
    """The seam between the tracker and wherever its sessions are kept."""

    kind = "?"  # what the store is, for logs and health checks: "embedded", "redis", ...

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

    @abc.abstractmethod
    def delete(self, *sessions: str) -> None:
        """Remove sessions, those that exist, in one call."""

    def ping(self) -> None:
        """Raise StoreUnavailable if the store cannot be reached."""

    def check(self) -> None:
        """At start-up: raise StoreUnavailable unless the store can be read and written."""
        self.ping()

    def close(self) -> None:
        """Release connections."""


class _Lru:
    """Items by key, least recently used first, with the bytes they hold summed: the one bound
    both stores keep (the embedded store on its sessions, the Redis store on its cache)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[str, tuple[object, int]] = collections.OrderedDict()
        self.bytes = 0

    def get(self, key: str):
        """The item, now the most recently used; None if absent."""
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key][0]

    def peek(self, key: str):
        """The item, its place in the order unchanged; None if absent."""
        item = self._items.get(key)
        return None if item is None else item[0]

    def keys(self) -> list[str]:
        return list(self._items)

    def put(self, key: str, value, size: int) -> None:
        """Add or replace an item, as the most recently used."""
        self.pop(key)
        self._items[key] = (value, size)
        self.bytes += size

    def pop(self, key: str):
        value, size = self._items.pop(key, (None, 0))
        self.bytes -= size
        return value

    def oldest(self) -> Optional[tuple[str, object]]:
        if not self._items:
            return None
        key, (value, _) = next(iter(self._items.items()))
        return key, value

    def shrink(self, *, keep: Optional[str] = None) -> None:
        """Drop the least recently used items until they fit, never `keep`."""
        while self.bytes > self.max_bytes:
            key, _ = self.oldest()
            if key == keep:
                return
            self.pop(key)


def _size(fields: Mapping[str, bytes]) -> int:
    return sum(len(k) + len(v) for k, v in fields.items())


class EmbeddedStore(StateStore):
    """Sessions in this process's memory; lost on restart, not shared between replicas.

    Bounded twice: a session expires `ttl_s` after its last use, and when the sessions together
    hold more than `max_bytes`, the least recently used ones are dropped (their objects answer
    410, re-initialize). Sessions are kept in order of last use, which is also the order in
    which they expire, so both bounds only ever drop from the front.
    """

    kind = "embedded"

    def __init__(self, *, ttl_s: float, max_bytes: int, clock=time.monotonic):
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions = _Lru(max_bytes)  # id -> [expiry, fields]

    def _live(self, session: str) -> dict[str, bytes]:
        """The session's fields, its lifetime refreshed; expired sessions are dropped first."""
        now = self._clock()
        while (oldest := self._sessions.oldest()) is not None and oldest[1][0] <= now:
            self._sessions.pop(oldest[0])
        entry = self._sessions.get(session)
        if entry is None:
            raise StateNotFound(f"tracking state {session} is unknown or has expired; re-initialize the object")
        entry[0] = now + self._ttl_s
        return entry[1]

    def _store(self, session: str, fields: dict[str, bytes]) -> None:
        self._sessions.put(session, [self._clock() + self._ttl_s, fields], _size(fields))
        self._sessions.shrink(keep=session)

    def create(self, session, fields):
        with self._lock:
            self._store(session, dict(fields))
            self._live(session)  # sweeps the expired ones

    def delete(self, *sessions):
        with self._lock:
            for session in sessions:
                self._sessions.pop(session)

    def read(self, session, names):
        with self._lock:
            fields = self._live(session)
            return {name: fields[name] for name in names if name in fields}

    def commit(self, session, *, guard, put, delete=()):
        with self._lock:
            fields = self._live(session)
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
            self._store(session, fields)
            return True


# --- Redis ------------------------------------------------------------------------------------

# Reserved field of every session hash: a random value replaced by every write, so a replica can
# tell whether the copy it cached is still current. Tracker field names never start with "#".
_GEN = "#gen"
_COMMIT_ATTEMPTS = 5  # a commit whose session changed under it checks the guard again


class _Entry:
    """One cached session: the fields this replica has seen, valid while `gen` is current."""

    def __init__(self, gen: bytes, fields: dict[str, bytes]):
        self.gen = gen
        self.fields = fields


class _SessionCache:
    """Recently used sessions, least recently used dropped first, at most `max_bytes` of fields."""

    def __init__(self, max_bytes: int):
        self._entries = _Lru(max_bytes)
        self._lock = threading.Lock()

    def lookup(self, session: str, names: Sequence[str]) -> tuple[Optional[bytes], dict[str, bytes]]:
        """(generation, the named fields held) of a cached session; (None, {}) if not cached."""
        with self._lock:
            entry = self._entries.get(session)
            if entry is None:
                return None, {}
            return entry.gen, {name: entry.fields[name] for name in names if name in entry.fields}

    def merge(self, session: str, gen: Optional[bytes], fields: Mapping[str, bytes]) -> None:
        """Add fields read at generation `gen`; a copy of another generation is replaced."""
        with self._lock:
            entry = self._entries.get(session)
            if entry is not None and entry.gen == gen:
                self._set(session, _Entry(gen, {**entry.fields, **fields}))
            elif gen is not None:
                self._set(session, _Entry(gen, dict(fields)))
            else:  # not a session this store wrote: nothing to key a cached copy on
                self._entries.pop(session)

    def advance(self, session, *, previous, gen, put: Mapping[str, bytes], delete: Sequence[str]) -> None:
        """Apply this replica's own commit, which moved the session from `previous` to `gen`."""
        with self._lock:
            entry = self._entries.get(session)
            # If another replica wrote in between, only the fields just written are known to exist.
            fields = dict(entry.fields) if entry is not None and entry.gen == previous else {}
            fields.update(put)
            for name in delete:
                fields.pop(name, None)
            self._set(session, _Entry(gen, fields))

    def drop(self, session: str) -> None:
        with self._lock:
            self._entries.pop(session)

    def _set(self, session: str, entry: _Entry) -> None:
        size = _size(entry.fields)
        if size > self._entries.max_bytes:  # too big to cache at all
            self._entries.pop(session)
            return
        self._entries.put(session, entry, size)
        self._entries.shrink()


class RedisStore(StateStore):
    """Sessions in Redis (or Kvrocks), shared by every replica; recently used ones cached here.

    A session is one hash, `<prefix><id>`: its fields plus `#gen`. Every write sets the key's TTL
    in the same transaction and every read refreshes it, so no key lives without one and a
    session lasts `ttl_s` after its last use. Only commands that Kvrocks 2.7, the Redis CVAT ships,
    has are sent: HMGET, HSET, HDEL, DEL, EXPIRE (without NX/XX/GT/LT), WATCH, MULTI/EXEC and PING.

    A replica's cached copy of a session is current while `#gen` is the one it last saw. Fields
    are write-once, so then only the fields it lacks are read; when another replica has written
    since, it reads everything again, because that replica may have deleted cached fields.
    """

    def __init__(self, connector: redis_client.Connector, *, prefix: str, ttl_s: int, cache_bytes: int):
        self._connector = connector
        self.kind = connector.kind
        self.where = connector.where
        self._prefix = prefix  # one prefix for every key: Kvrocks before 2.15 ignores SELECT
        self._ttl_s = ttl_s
        self._cache = _SessionCache(cache_bytes)

    @classmethod
    def from_settings(cls, settings) -> "RedisStore":
        """The store; init_context builds one per worker process."""
        return cls(
            redis_client.connect(settings),
            prefix=settings.state_prefix,
            ttl_s=settings.state_ttl_s,
            cache_bytes=settings.cache_bytes,
        )

    @property
    def _client(self):
        # Only ever used inside `_call`: building a Cluster client connects, and may fail.
        return self._connector.client()

    def create(self, session, fields):
        key = self._prefix + session
        gen = secrets.token_bytes(8)

        def write():
            pipe = self._client.pipeline(transaction=True)  # MULTI/EXEC: the hash and its TTL together
            pipe.hset(key, mapping={_GEN: gen, **fields})
            pipe.expire(key, self._ttl_s)
            return pipe.execute()

        self._call(session, write)
        self._cache.merge(session, gen, fields)

    def read(self, session, names):
        gen, cached = self._cache.lookup(session, names)
        missing = [name for name in names if name not in cached]
        current, fetched = self._fetch(session, missing, refresh=True)
        if cached and current != gen:
            # Another replica wrote since this copy was cached and may have deleted some of its
            # fields: read those again, and everything at once if yet another write came between.
            again, refetched = self._fetch(session, list(cached), refresh=False)
            if again == current:
                fetched.update(refetched)
            else:
                current, fetched = self._fetch(session, list(names), refresh=False)
            cached = {}
        self._cache.merge(session, current, fetched)
        return {**cached, **fetched}

    def _fetch(self, session: str, names: list, *, refresh: bool) -> tuple[Optional[bytes], dict[str, bytes]]:
        """(generation, the named fields that exist), in one round trip; refresh: also the TTL."""
        key = self._prefix + session

        def read():
            pipe = self._client.pipeline(transaction=False)
            if refresh:
                pipe.expire(key, self._ttl_s)  # 0: no such key
            pipe.hmget(key, [_GEN, *names])
            return pipe.execute()

        replies = self._call(session, read)
        gen, *values = replies[-1]
        if (refresh and not replies[0]) or (not refresh and gen is None):
            self._cache.drop(session)
            raise StateNotFound(f"tracking state {session} is unknown or has expired; re-initialize the object")
        return gen, {name: value for name, value in zip(names, values) if value is not None}

    def commit(self, session, *, guard, put, delete=()):
        key = self._prefix + session
        name, value = guard
        gen = secrets.token_bytes(8)
        writes = [("HSET", key, _GEN, gen, name, value, *(item for field in put.items() for item in field))]
        if delete:
            writes.append(("HDEL", key, *delete))
        writes.append(("EXPIRE", key, self._ttl_s))

        def decide(held, previous):
            # Write only if the session exists and nobody has taken the guard field yet.
            return writes if previous is not None and held is None else []

        for _ in range(_COMMIT_ATTEMPTS):
            (held, previous), done = self._call(session, lambda: self._watched(key, [name, _GEN], decide))
            if previous is None:
                self._cache.drop(session)
                raise StateNotFound(f"tracking state {session} is unknown or has expired; re-initialize the object")
            if held == value:
                return False  # a retry of a request that already committed
            if held is not None:
                raise StateConflict(
                    f"tracking state {session} was already advanced by another request; re-initialize the object"
                )
            if done is not None:
                self._cache.advance(session, previous=previous, gen=gen, put={name: value, **put}, delete=delete)
                return True
            # The session changed between the check and the write (EXEC did nothing): check again.
        raise StateConflict(f"tracking state {session} is being changed by several requests at once; retry")

    def _watched(self, key: str, names: list, decide) -> tuple[list, Optional[list]]:
        """WATCH key, HMGET its `names`, then MULTI, the commands `decide(*values)` returns, EXEC.

        Returns (values, EXEC's replies); the replies are None when the key changed after WATCH,
        in which case nothing was written. Two round trips on one connection, never retried: a
        retry on another connection would run MULTI/EXEC without the WATCH. EXEC ends the WATCH.
        """
        pool = self._pool_for(key)
        conn = pool.get_connection()
        try:
            conn.send_packed_command(conn.pack_commands([("WATCH", key), ("HMGET", key, *names)]))
            conn.read_response()
            values = conn.read_response()
            commands = decide(*values)
            conn.send_packed_command(conn.pack_commands([("MULTI",), *commands, ("EXEC",)]))
            for _ in range(len(commands) + 1):
                conn.read_response()  # OK, then QUEUED per command
            done = conn.read_response()
            if done is not None:
                for reply in done:
                    if isinstance(reply, redis.ResponseError):
                        raise reply
            return values, done
        except BaseException as e:
            conn.disconnect()  # never pool a connection with a WATCH pending or replies unread
            if isinstance(e, redis.exceptions.MovedError) and isinstance(self._client, redis.RedisCluster):
                self._client.nodes_manager.initialize()  # the slot moved: a retry finds its node
            raise
        finally:
            pool.release(conn)

    def _pool_for(self, key: str) -> redis.ConnectionPool:
        """The connections to the server holding `key`: in a Cluster, its slot's master."""
        client = self._client
        if isinstance(client, redis.RedisCluster):
            return client.get_redis_connection(client.get_node_from_key(key)).connection_pool
        return client.connection_pool

    def delete(self, *sessions):
        for session in sessions:
            self._cache.drop(session)
        self._call(None, lambda: self._client.delete(*(self._prefix + s for s in sessions)))

    def ping(self):
        self._call(None, lambda: self._client.ping())

    def check(self):
        # A throw-away session taken through every command a request sends, under the prefix: an
        # ACL without one of them or without the prefix's keys (NOPERM), a read-only replica
        # (READONLY) or a Cluster node used as a single server (MOVED, or CROSSSLOT from the DEL
        # of two keys) shows at start-up, not on the first annotator's request. Its name is
        # random, so replicas starting together do not meet, and it expires like any session.
        self.ping()
        first, second = (f"#start-up-check-{secrets.token_hex(8)}" for _ in range(2))
        self.create(first, {"s:0": b"0", "m:0": b"0"})
        self.read(first, ["s:0"])
        self.commit(first, guard=("s:1", b"1"), put={"m:1": b"1"}, delete=["m:0"])
        self.delete(first, second)

    def close(self):
        if self._connector.built:
            self._client.close()

    def _words(self, error: BaseException) -> str:
        """The error's own words, any key in them (a session id) masked: some redis-py errors
        quote the command they failed on."""
        return re.sub(re.escape(self._prefix) + r"[^\s'\",)\]]*", "<key>", reason(error))

    def _call(self, session: Optional[str], fn):
        """Run fn, turning Redis' errors into the tracker's own. Messages carry the error's own
        words only (`reason`), never the command redis-py may prefix, which names the session."""
        try:
            return fn()
        except MasterNotFoundError as e:  # its text lists every Sentinel client's settings
            raise StoreUnavailable(
                f"state store ({self.where}): the Sentinels name no master that is up; retry later"
            ) from e
        except redis.AuthenticationError as e:
            raise StoreUnavailable(f"state store ({self.where}) refused the user or password ({self._words(e)})") from e
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise StoreUnavailable(
                f"state store ({self.where}) is unreachable or did not answer in time ({self._words(e)}); retry later"
            ) from e
        except (redis.exceptions.MovedError, redis.exceptions.AskError) as e:  # a commit's own connection
            if not isinstance(self._client, redis.RedisCluster):
                raise StoreUnavailable(f"state store ({self.where}) is a Redis Cluster node: set "
                                       "SAM2_REDIS_CLUSTER=true") from e
            raise StoreUnavailable(f"state store ({self.where}): a slot moved to another node; retry") from e
        except redis.exceptions.ReadOnlyError as e:
            # A failover behind one address (DNS, a managed service): drop the connections to the
            # demoted master, so that the retry connects to the new one.
            if not isinstance(self._client, redis.RedisCluster):
                self._client.connection_pool.disconnect()
            raise StoreUnavailable(f"state store ({self.where}) is a read-only replica now; retry later") from e
        except redis.ResponseError as e:
            if session is not None and reason(e).startswith("WRONGTYPE"):
                raise StateNotFound(
                    f"tracking state {session} is not a tracking session in the store; re-initialize the object"
                ) from e
            raise StoreUnavailable(f"state store ({self.where}) refused a command ({self._words(e)})") from e
        except (redis.RedisError, RedisClusterException) as e:
            raise StoreUnavailable(f"state store ({self.where}) failed ({self._words(e)})") from e


def make_store(settings) -> StateStore:
    """The Redis store when a Redis is configured (host, URL or Sentinels), else the embedded one."""
    if settings.uses_redis:
        return RedisStore.from_settings(settings)
    return EmbeddedStore(ttl_s=settings.state_ttl_s, max_bytes=settings.cache_bytes)
