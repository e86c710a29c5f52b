"""The Redis client behind the state store, built from the settings, and the start-up check.

Three topologies, one client interface: a single server (host and port, or a URL), a master
found through Sentinels, or a Redis Cluster. Every connection speaks RESP2 (Kvrocks 2.7 has no
RESP3, and newer redis-py releases would ask for it), announces nothing (CLIENT SETINFO is not in
Kvrocks 2.7) and sends a username only when one is set (Kvrocks 2.7 refuses `AUTH user pass`).
"""

import ssl
import threading
import urllib.parse
from typing import Optional

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel


# Every command the state store sends (Kvrocks 2.7 has them all); an ACL user needs these on the
# key prefix. The Sentinel client also asks the Sentinels (not the data nodes) SENTINEL MASTERS.
COMMANDS = ("HMGET", "HSET", "HDEL", "DEL", "EXPIRE", "WATCH", "MULTI", "EXEC", "PING")
# What the Cluster client adds, to any one node: the slot map, and the command table it reads
# key positions from.
CLUSTER_COMMANDS = ("CLUSTER|SLOTS", "COMMAND")


class StoreMisconfigured(Exception):
    """The store answers, but the settings cannot work: fix them and restart."""


class Connector:
    """How to reach the store: `client()` builds the client on first use, inside the store's
    error handling, since a Cluster client connects as soon as it is built."""

    def __init__(self, build, *, where: str, kind: str):
        self._build = build
        self._client = None
        self._lock = threading.Lock()  # the health-check thread may ask first
        self.where = where  # names the store in messages, never with a password
        self.kind = kind  # "redis", "redis-sentinel" or "redis-cluster", for logs

    @property
    def built(self) -> bool:
        return self._client is not None

    def client(self):
        if self._client is not None:  # every store call asks: no lock once built
            return self._client
        with self._lock:
            if self._client is None:
                self._client = self._build()
            return self._client


def connect(settings) -> Connector:
    timeouts = {
        # Bounded waits: a slow or unreachable Redis costs a request about this long, once.
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": settings.redis_timeout_s,
    }
    plain = {**timeouts, "protocol": 2, "driver_info": None}  # driver_info None: no CLIENT SETINFO
    auth = {"username": settings.redis_username, "password": settings.redis_password}
    # A pooled connection that a Redis restart dropped is retried once on a fresh one; reads and
    # `create` are idempotent, and a commit runs on a connection of its own, never retried. A
    # timeout is not retried: it would double the wait.
    retry = {"retry": Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))}
    tls = _tls(settings)
    address = _address(settings)

    if settings.redis_sentinels:
        # The Sentinels are reached with the same TLS settings but without the data user and
        # password (see the README), and each is asked once: the next one is the retry.
        sentinel_kwargs = {**plain, **tls, "retry": Retry(NoBackoff(), 0)}

        def build():
            sentinel = Sentinel(list(settings.redis_sentinels), sentinel_kwargs=sentinel_kwargs,
                                **plain, **auth, **retry, **tls)
            return sentinel.master_for(settings.redis_sentinel_master, redis_class=redis.Redis)

        nodes = ",".join(f"{host}:{port}" for host, port in settings.redis_sentinels)
        where = f"Redis master {settings.redis_sentinel_master!r} via Sentinels {nodes}"
        return Connector(build, where=where, kind="redis-sentinel")

    if settings.redis_cluster:
        # No retry: a node's connection error already makes the client reload the slot map, and
        # the caller's retry of the request then finds the right node.
        options = {**plain, **auth, **tls, "retry": Retry(NoBackoff(), 0), "require_full_coverage": True}

        def build():
            if settings.redis_url:
                return redis.RedisCluster.from_url(settings.redis_url, **options)
            return redis.RedisCluster(host=settings.redis_host, port=settings.redis_port, **options)

        return Connector(build, where=f"Redis Cluster at {address}", kind="redis-cluster")

    options = {**plain, **auth, **retry, **tls}
    if tls:
        options["connection_class"] = redis.SSLConnection
        del options["ssl"]  # the connection class says it

    def build():
        if settings.redis_url:
            # A user or password in the URL wins over the (then unset: config.py checks) variables.
            pool = redis.ConnectionPool.from_url(settings.redis_url, **options)
        else:
            pool = redis.ConnectionPool(host=settings.redis_host, port=settings.redis_port, **options)
        return redis.Redis(connection_pool=pool)

    where = f"Redis at {address}" + (" over TLS" if tls and not address.startswith("rediss:") else "")
    return Connector(build, where=where, kind="redis")


def _tls(settings) -> dict:
    if not settings.redis_tls:
        return {}
    return {
        "ssl": True,
        "ssl_ca_certs": settings.redis_tls_ca_file,  # None: the system's trusted CAs
        "ssl_certfile": settings.redis_tls_cert_file,
        "ssl_keyfile": settings.redis_tls_key_file,
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
    }


def _address(settings) -> str:
    """Where the store is, for messages: never the password a URL may hold."""
    if settings.redis_url:
        url = urllib.parse.urlsplit(settings.redis_url)
        if url.scheme == "unix":
            return f"unix://{url.path}"
        host = f"[{url.hostname}]" if ":" in (url.hostname or "") else url.hostname
        return f"{url.scheme}://{host}:{url.port or 6379}"
    return f"{settings.redis_host}:{settings.redis_port}"


def misconfiguration(error: BaseException, settings) -> Optional[str]:
    """What is wrong with the settings, if `error` (or an error it was raised from) says they
    cannot work; None for an outage, which may pass."""
    for cause in _chain(error):
        problem = _problem(cause, settings)
        if problem is not None:
            return problem
    return None


def _chain(error: Optional[BaseException]):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _problem(error: BaseException, settings) -> Optional[str]:
    text = reason(error)
    # Kvrocks 2.7 answers `AUTH user pass` with a bare "wrong number of arguments", which redis-py
    # does not recognise as an AUTH error (it would then have retried without the user).
    has_user = settings.redis_username or urllib.parse.urlsplit(settings.redis_url or "").username
    if has_user and isinstance(error, redis.ResponseError) and text.startswith("wrong number of arguments"):
        return "the server takes no user name (Kvrocks 2.7 does not): unset SAM2_REDIS_USERNAME or the URL's user"
    # redis-py turns the server's error codes into classes: WRONGPASS and NOAUTH into
    # AuthenticationError, NOPERM into NoPermissionError, READONLY into ReadOnlyError.
    if isinstance(error, redis.AuthenticationError):
        return (
            f"the server refused the user or password ({text}); check SAM2_REDIS_USERNAME, "
            "SAM2_REDIS_PASSWORD_FILE or CVAT_FUNCTIONS_REDIS_PASSWORD"
        )
    if isinstance(error, redis.exceptions.NoPermissionError):
        return (
            f"the user may not run the store's commands on its keys ({text}); grant "
            f"{' '.join(COMMANDS)} on ~{settings.state_prefix}* (SAM2_STATE_PREFIX)"
        )
    if isinstance(error, redis.exceptions.ReadOnlyError):
        return "the server is a read-only replica; point the function at the master"
    cluster_node = isinstance(error, (redis.exceptions.MovedError, redis.exceptions.AskError))
    cluster_node = cluster_node or isinstance(error, redis.exceptions.ClusterCrossSlotError)  # CROSSSLOT
    if not settings.redis_cluster and cluster_node:
        return "the server is a Redis Cluster node: set SAM2_REDIS_CLUSTER=true"
    if "cluster support disabled" in text or "Cluster mode is not enabled" in text:
        return "the server is not part of a Redis Cluster: unset SAM2_REDIS_CLUSTER"
    # Any other refusal of the start-up check's commands, from a healthy server (say "EXEC
    # without MULTI" from an ACL lacking MULTI, whose own NOPERM redis-py does not report).
    passing = (redis.exceptions.OutOfMemoryError, redis.exceptions.ClusterDownError, redis.exceptions.TryAgainError)
    if isinstance(error, redis.ResponseError) and not isinstance(error, passing) and not text.startswith(
        ("MASTERDOWN", "LOADING", "BUSY")
    ):
        return (
            f"the server refused a command the function needs ({text}); the user needs "
            f"{' '.join(COMMANDS)} on ~{settings.state_prefix}*"
        )
    tls = _tls_misconfiguration(error)
    if tls is not None:
        return (
            f"the TLS handshake failed ({tls}); check SAM2_REDIS_TLS_CA_FILE, "
            "SAM2_REDIS_TLS_CERT_FILE, SAM2_REDIS_TLS_KEY_FILE and the server's host name"
        )
    if isinstance(error, MasterNotFoundError) and not _master_known(settings):
        return (
            f"no Sentinel knows a master named {settings.redis_sentinel_master!r}; "
            "check SAM2_REDIS_SENTINEL_MASTER and SAM2_REDIS_SENTINELS"
        )
    return None


def tls_hint(error: Optional[BaseException], settings) -> str:
    """For an outage at start-up, what a TLS mismatch would look like: a TLS server drops a plain
    connection, and a plain one never answers a TLS handshake (it waits for a newline)."""
    text = " ".join(str(e) for e in _chain(error))
    if settings.redis_tls and "Timeout" in text:
        return "if the server does not use TLS, use redis:// and no SAM2_REDIS_TLS_* files"
    if not settings.redis_tls and ("reset by peer" in text or "Connection closed" in text):
        return "if the server uses TLS, use a rediss:// URL or set SAM2_REDIS_TLS_CA_FILE"
    return ""


def reason(error: BaseException) -> str:
    """The error in the server's or the system's own words: redis-py prefixes a pipeline's errors
    with the whole command, keys and values included, which must not reach a log or an answer."""
    return str(error).rpartition(" of pipeline caused error: ")[2][:300]


# Handshake failures that settings cause (a certificate, a key, a protocol), unlike an endpoint
# that closes the connection while its backend starts (UNEXPECTED_EOF_WHILE_READING): that passes.
_TLS_SETTINGS_FAILURES = (
    "CERTIFICATE", "UNKNOWN_CA", "WRONG_VERSION_NUMBER", "PROTOCOL_VERSION", "HANDSHAKE_FAILURE",
    "PEM_LIB", "KEY_VALUES_MISMATCH", "ACCESS_DENIED", "DECRYPT_ERROR", "NO_START_LINE",
)


def _tls_misconfiguration(error: BaseException) -> Optional[str]:
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"{error.reason}: {error.verify_message}"
    if isinstance(error, ssl.SSLError) and any(part in (error.reason or "") for part in _TLS_SETTINGS_FAILURES):
        return error.reason
    return None


def _master_known(settings) -> bool:
    """Whether any Sentinel lists the master (down or not); True when none can be asked."""
    for host, port in settings.redis_sentinels:
        client = redis.Redis(host=host, port=port, socket_timeout=settings.redis_timeout_s, protocol=2,
                             driver_info=None, retry=Retry(NoBackoff(), 0), **_tls(settings))
        try:
            return settings.redis_sentinel_master in client.sentinel_masters()
        except redis.RedisError:
            continue
        finally:
            client.close()
    return True
