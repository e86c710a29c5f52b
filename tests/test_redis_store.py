"""The Redis store's contract on a real redis-server: the embedded store's contract, plus TTLs on
every key, atomic writes, a per-replica cache that is never stale, and clear faults."""

import signal
import subprocess
import sys
import time

import pytest

from config import Settings
from errors import StateConflict, StateNotFound, StoreUnavailable
from redis_server import RedisServer, free_port, redis_server  # noqa: F401 - fixture
from state_store import RedisStore, make_store
from support import ROOT

PREFIX = "test-sam2:"


def make(server: RedisServer, **overrides) -> RedisStore:
    options = {"redis_host": "127.0.0.1", "redis_port": server.port, "state_prefix": PREFIX, "state_ttl_s": 100}
    return RedisStore.from_settings(Settings(**{**options, **overrides}))


@pytest.fixture
def server(redis_server):  # noqa: F811
    redis_server.flush()
    return redis_server


def sent_bytes(server: RedisServer) -> int:
    """Bytes the server has sent to its clients so far (each call adds about 2 KiB: INFO's reply)."""
    return server.client().info("stats")["total_net_output_bytes"]


def test_make_store_picks_redis_when_a_host_is_set(server):
    assert isinstance(make_store(Settings(redis_host="127.0.0.1", redis_port=server.port)), RedisStore)


def test_read_returns_only_existing_fields(server):
    store = make(server)
    store.create("a", {"x": b"1"})
    assert store.read("a", ["x", "y"]) == {"x": b"1"}
    assert make(server).read("a", ["x", "y"]) == {"x": b"1"}  # another replica, nothing cached


def test_commit_writes_puts_and_deletes_atomically(server):
    store = make(server)
    store.create("a", {"x": b"1", "old": b"0"})
    assert store.commit("a", guard=("g", b"t1"), put={"y": b"2"}, delete=["old"]) is True
    expected = {"x": b"1", "y": b"2", "g": b"t1"}
    assert store.read("a", ["x", "y", "g", "old"]) == expected
    assert make(server).read("a", ["x", "y", "g", "old"]) == expected


def test_commit_with_the_same_guard_is_a_no_op_and_another_guard_conflicts(server):
    store = make(server)
    store.create("a", {})
    store.commit("a", guard=("g", b"t1"), put={"y": b"2"})
    assert store.commit("a", guard=("g", b"t1"), put={"y": b"other"}) is False
    assert make(server).read("a", ["y"]) == {"y": b"2"}
    with pytest.raises(StateConflict) as e:
        make(server).commit("a", guard=("g", b"t2"), put={"y": b"3"})
    assert e.value.status == 409
    assert make(server).read("a", ["y", "g"]) == {"y": b"2", "g": b"t1"}


def test_unknown_session_is_410_and_a_commit_to_it_writes_nothing(server):
    store = make(server)
    with pytest.raises(StateNotFound, match="re-initialize") as e:
        store.read("nope", ["x"])
    assert e.value.status == 410
    with pytest.raises(StateNotFound, match="re-initialize"):
        store.commit("nope", guard=("g", b"t"), put={"x": b"1"})
    assert server.client().keys("*") == []


def test_every_key_has_one_prefix_and_a_ttl_refreshed_on_use(server):
    store = make(server, state_ttl_s=100)
    raw = server.client()
    store.create("a", {"x": b"1"})
    assert raw.keys("*") == [f"{PREFIX}a".encode()]
    assert 95 < raw.ttl(f"{PREFIX}a") <= 100
    raw.expire(f"{PREFIX}a", 5)
    store.read("a", ["x"])
    assert raw.ttl(f"{PREFIX}a") > 95
    raw.expire(f"{PREFIX}a", 5)
    store.commit("a", guard=("g", b"t"), put={"y": b"2"}, delete=["x"])
    assert raw.ttl(f"{PREFIX}a") > 95


def test_sessions_expire_unless_used(server):
    store = make(server, state_ttl_s=1)
    store.create("a", {"x": b"1"})
    time.sleep(1.2)
    with pytest.raises(StateNotFound):
        store.read("a", ["x"])  # cached here, but expiry in Redis wins
    assert server.client().keys("*") == []


def test_a_replica_reads_another_replicas_commits_and_never_a_deleted_field(server):
    first, second = make(server), make(server)
    first.create("a", {"m:1": b"one", "m:2": b"two"})
    assert first.read("a", ["m:1", "m:2"]) == {"m:1": b"one", "m:2": b"two"}  # now cached in first
    second.commit("a", guard=("s:3", b"t3"), put={"m:3": b"three"}, delete=["m:1"])
    assert first.read("a", ["m:1", "m:2", "m:3"]) == {"m:2": b"two", "m:3": b"three"}
    first.commit("a", guard=("s:4", b"t4"), put={"m:4": b"four"}, delete=["m:2"])
    assert second.read("a", ["m:2", "m:3", "m:4"]) == {"m:3": b"three", "m:4": b"four"}


def test_a_replica_with_a_current_copy_skips_reading_the_big_fields(server):
    big = bytes(range(256)) * 4096  # 1 MiB
    store = make(server)
    store.create("a", {"big": big})
    before = sent_bytes(server)
    assert store.read("a", ["big", "small"]) == {"big": big}
    assert sent_bytes(server) - before < 16 * 1024
    before = sent_bytes(server)
    assert make(server).read("a", ["big"]) == {"big": big}  # another replica: from Redis
    assert sent_bytes(server) - before > len(big)


def test_the_cache_is_bounded_in_bytes(server):
    store = make(server, cache_bytes=3 * 110_000)
    for name in "abcd":
        store.create(name, {"v": name.encode() * 100_000})
    before = sent_bytes(server)
    store.read("d", ["v"])
    assert sent_bytes(server) - before < 16 * 1024  # recent: cached
    before = sent_bytes(server)
    store.read("a", ["v"])
    assert sent_bytes(server) - before > 100_000  # least recently used: dropped, read again


# A replica process running the store's real `commit`, killed (SIGKILL) once it has sent MULTI and
# the queued writes but before EXEC: the death a crash or an OOM kill would cause.
_DIES_INSIDE_COMMIT = """
import os, signal, sys, time
sys.path.insert(0, sys.argv[3])
from redis.connection import Connection
from config import Settings
from state_store import RedisStore

send = Connection.send_packed_command

def dying(self, command, check_health=True):
    data = b"".join(command) if isinstance(command, list) else command
    if b"MULTI" in data:
        send(self, [data[: data.rindex(b"*1\\r\\n$4\\r\\nEXEC\\r\\n")]], check_health)
        time.sleep(0.3)  # the server reads MULTI and queues the writes
        os.kill(os.getpid(), signal.SIGKILL)
    return send(self, command, check_health)

Connection.send_packed_command = dying
store = RedisStore.from_settings(Settings(redis_host="127.0.0.1", redis_port=int(sys.argv[1]), state_prefix=sys.argv[2]))
store.commit("a", guard=("s:1", b"t1"), put={"m:1": b"x" * 10000}, delete=["s:0"])
"""


def test_a_replica_killed_inside_a_commit_leaves_the_previous_state(server):
    store = make(server)
    store.create("a", {"s:0": b"t0"})
    child = subprocess.run(
        [sys.executable, "-c", _DIES_INSIDE_COMMIT, str(server.port), PREFIX, ROOT], capture_output=True, text=True
    )
    assert child.returncode == -signal.SIGKILL, child.stderr  # it died inside commit, before EXEC
    assert make(server).read("a", ["s:0", "s:1", "m:1"]) == {"s:0": b"t0"}
    assert store.commit("a", guard=("s:1", b"t1"), put={"m:1": b"y"}) is True
    assert make(server).read("a", ["s:1", "m:1"]) == {"s:1": b"t1", "m:1": b"y"}


class Overtaken(RedisStore):
    """A store whose next commit is overtaken by `meanwhile()` between its check and its write."""

    meanwhile = None

    def _watched(self, key, names, decide):
        def overtaken(*values):
            if self.meanwhile is not None:
                meanwhile, self.meanwhile = self.meanwhile, None
                meanwhile()
            return decide(*values)

        return super()._watched(key, names, overtaken)


def overtaken(server) -> Overtaken:
    return Overtaken.from_settings(Settings(redis_host="127.0.0.1", redis_port=server.port, state_prefix=PREFIX))


def test_a_commit_overtaken_by_another_replicas_commit_is_a_conflict(server):
    store, other = overtaken(server), make(server)
    store.create("a", {"s:0": b"t0"})
    store.meanwhile = lambda: other.commit("a", guard=("s:1", b"theirs"), put={"m:1": b"theirs"})
    with pytest.raises(StateConflict):
        store.commit("a", guard=("s:1", b"mine"), put={"m:1": b"mine"})
    assert make(server).read("a", ["s:1", "m:1"]) == {"s:1": b"theirs", "m:1": b"theirs"}


def test_a_commit_overtaken_by_a_harmless_write_checks_again_and_writes(server):
    store, other = overtaken(server), make(server)
    store.create("a", {"s:0": b"t0"})
    store.meanwhile = lambda: other.read("a", ["s:0"])  # refreshes the TTL: a write to the key
    assert store.commit("a", guard=("s:1", b"mine"), put={"m:1": b"mine"}) is True
    assert make(server).read("a", ["s:1", "m:1"]) == {"s:1": b"mine", "m:1": b"mine"}


def test_a_key_of_another_type_is_refused_as_unknown_state(server):
    server.client().set(f"{PREFIX}a", b"junk")
    with pytest.raises(StateNotFound, match="re-initialize"):
        make(server).read("a", ["x"])


def test_unreachable_redis_is_503_naming_the_state_store():
    port = free_port()  # nothing listens there
    store = RedisStore.from_settings(Settings(redis_host="127.0.0.1", redis_port=port, redis_timeout_s=1))
    for call in (lambda: store.read("a", ["x"]), lambda: store.create("a", {"x": b"1"}), store.ping):
        with pytest.raises(StoreUnavailable) as e:
            call()
        assert e.value.status == 503
        assert f"state store (Redis at 127.0.0.1:{port})" in str(e.value)


def test_the_store_recovers_by_itself_when_redis_is_back():
    server = RedisServer().start()
    try:
        store = make(server)
        store.create("a", {"x": b"1"})
        server.stop()
        with pytest.raises(StoreUnavailable):
            store.read("a", ["x"])
        server.start()  # empty: nothing was persisted
        store.ping()
        with pytest.raises(StateNotFound, match="re-initialize"):
            store.read("a", ["x"])
        store.create("b", {"x": b"2"})
        assert make(server).read("b", ["x"]) == {"x": b"2"}
    finally:
        server.close()


def test_a_slow_redis_times_out_instead_of_hanging(server):
    store = make(server, redis_timeout_s=1)
    store.create("a", {"x": b"1"})
    server.pause()
    try:
        for call in (lambda: store.read("a", ["x"]), store.ping):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="did not answer in time"):
                call()
            assert time.monotonic() - started < 1.8  # one timeout: a timed-out call is not retried
    finally:
        server.resume()
    assert store.read("a", ["x"]) == {"x": b"1"}
