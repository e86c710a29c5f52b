"""The Redis client behind the state store, built from the settings, and the start-up check.

Three topologies, one client interface: a single server (host and port, or a URL), a master
found through Sentinels, or a Redis Cluster. Every connection speaks RESP2 (Kvrocks 2.7 has no
RESP3, and newer redis-py releases would ask for it), announces nothing (CLIENT SETINFO is not in
Kvrocks 2.7) and sends a username only when one is set (Kvrocks 2.7 refuses `AUTH user pass`).
"""

import ssl
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


def connect(settings) -> tuple[redis.Redis, str, str]:
    """(client, where, kind): `where` names the store in error messages, `kind` in logs."""
    timeouts = {
        # Bounded waits: a slow or unreachable Redis costs a request at most about this long.
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": settings.redis_timeout_s,
    }
    plain = {**timeouts, "protocol": 2, "lib_name": None, "lib_version": None}
    auth = {"username": settings.redis_username, "password": settings.redis_password}
    # A pooled connection that a Redis restart dropped is retried once on a fresh one; reads and
    # `create` are idempotent. A commit is not retried there: a caller that retries the request
    # gets the same answer (the guard). Timeouts are not retried.
    retry = {"retry": Retry(NoBackoff(), 1), "retry_on_error": [redis.ConnectionError]}
    tls = _tls(settings)

    if settings.redis_sentinels:
        # The Sentinels are reached with the same TLS settings but without the data user and
        # password: Sentinels have their own (`requirepass` in sentinel.conf), rarely set.
        sentinel = Sentinel(
            list(settings.redis_sentinels), sentinel_kwargs={**plain, **tls}, **plain, **auth, **retry, **tls
        )
        client = sentinel.master_for(settings.redis_sentinel_master, redis_class=redis.Redis)
        nodes = ",".join(f"{host}:{port}" for host, port in settings.redis_sentinels)
        return client, f"Redis master {settings.redis_sentinel_master!r} via Sentinels {nodes}", "redis-sentinel"

    if settings.redis_cluster:
        # One key per operation, so every command and transaction goes to one slot's node.
        options = {**plain, **auth, **tls, "retry": Retry(NoBackoff(), 1), "require_full_coverage": True}
        if settings.redis_url:
            client = redis.RedisCluster.from_url(settings.redis_url, **options)
        else:
            client = redis.RedisCluster(host=settings.redis_host, port=settings.redis_port, **options)
        return client, f"Redis Cluster at {_address(settings)}", "redis-cluster"

    options = {**plain, **auth, **retry, **tls}
    if tls:
        options["connection_class"] = redis.SSLConnection
        del options["ssl"]  # the connection class says it
    if settings.redis_url:
        # A user or password in the URL wins over the (then unset: config.py checks) variables.
        pool = redis.ConnectionPool.from_url(settings.redis_url, **options)
    else:
        pool = redis.ConnectionPool(host=settings.redis_host, port=settings.redis_port, **options)
    address = _address(settings)
    where = f"Redis at {address}" + (" over TLS" if tls and not address.startswith("rediss:") else "")
    return redis.Redis(connection_pool=pool), where, "redis"


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
        host = url.path if url.scheme == "unix" else f"{url.hostname}:{url.port or 6379}"
        return f"{url.scheme}://{host}"
    return f"{settings.redis_host}:{settings.redis_port}"


def misconfiguration(error: BaseException, settings) -> Optional[str]:
    """What is wrong with the settings, if `error` says they cannot work; None for an outage."""
    # Kvrocks 2.7 answers `AUTH user pass` with a bare "wrong number of arguments", which redis-py
    # does not recognise as an AUTH error (it would then have retried without the user).
    takes_no_user = isinstance(error, redis.ResponseError) and reason(error).startswith("wrong number of arguments")
    if settings.redis_username and takes_no_user:
        return "the server takes no user name (Kvrocks 2.7 does not): unset SAM2_REDIS_USERNAME"
    # redis-py turns the server's error codes into classes: WRONGPASS and NOAUTH into
    # AuthenticationError, NOPERM into NoPermissionError, READONLY into ReadOnlyError.
    if isinstance(error, redis.AuthenticationError):
        return (
            f"the server refused the user or password ({error}); check SAM2_REDIS_USERNAME, "
            "SAM2_REDIS_PASSWORD_FILE or CVAT_FUNCTIONS_REDIS_PASSWORD"
        )
    if isinstance(error, redis.exceptions.NoPermissionError):
        return (
            f"the user may not run the store's commands on its keys ({reason(error)}); grant "
            f"{' '.join(COMMANDS)} on ~{settings.state_prefix}* (SAM2_STATE_PREFIX)"
        )
    if isinstance(error, redis.exceptions.ReadOnlyError):
        return "the server is a read-only replica; point the function at the master"
    if _tls_failure(error):
        return (
            f"the TLS handshake failed ({_tls_failure(error)}); check SAM2_REDIS_TLS_CA_FILE, "
            "SAM2_REDIS_TLS_CERT_FILE, SAM2_REDIS_TLS_KEY_FILE and the server's host name"
        )
    if isinstance(error, MasterNotFoundError) and not _master_known(settings):
        return (
            f"no Sentinel knows a master named {settings.redis_sentinel_master!r}; "
            "check SAM2_REDIS_SENTINEL_MASTER and SAM2_REDIS_SENTINELS"
        )
    return None


def reason(error: redis.ResponseError) -> str:
    """The server's own words: redis-py prefixes a pipeline's errors with the whole command,
    values included, which must not reach a log or an answer."""
    return str(error).rpartition(" of pipeline caused error: ")[2][:300]


def _tls_failure(error: Optional[BaseException]) -> Optional[str]:
    """The SSL error inside a connection error, as a short reason."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ssl.SSLError):
            return error.reason or str(error)
        error = error.__cause__ or error.__context__
    return None


def _master_known(settings) -> bool:
    """Whether any Sentinel lists the master (down or not); True when none can be asked."""
    for host, port in settings.redis_sentinels:
        try:
            client = redis.Redis(
                host=host, port=port, socket_timeout=settings.redis_timeout_s, protocol=2,
                lib_name=None, lib_version=None, **_tls(settings),
            )
            return settings.redis_sentinel_master in client.sentinel_masters()
        except redis.RedisError:
            continue
    return True
