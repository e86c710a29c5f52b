"""The state store on production Redis set-ups, all real servers on loopback: TLS with client
certificates, an ACL user with a password file, Sentinel (with a failover), and Cluster. Each
serves a whole session across two replicas with the official predictor's masks, and each kind of
misconfiguration stops the function at start-up with one line saying what to fix."""

import collections
import json
import logging
import os
import signal
import subprocess
import sys
import time

import nuclio_sdk
import numpy as np
import pytest
import redis

from config import Settings
from redis_client import CLUSTER_COMMANDS, COMMANDS
from redis_server import RedisServer, free_port, redis_server  # noqa: F401 - fixture
from errors import StoreUnavailable
from redis_topologies import Cluster, SentinelSet, acl_server, make_certificates, store_user, tls_server
from replicas import Replica
from state_store import RedisStore
from support import (
    FRAME_H, FRAME_W, ROOT, Function, answer_mask, assert_same_masks, body, first_masks, mask_shape, model_env,
    start_up_failure,
)

PREFIX = "sam2-tracker:"  # the default SAM2_STATE_PREFIX


@pytest.fixture(scope="module")
def frames(video):
    assert len(video) >= 16  # the official predictor matches one-request-at-a-time tracking from 16 frames on
    return video


@pytest.fixture(scope="module")
def official(official_video):
    return official_video


def replicas(checkpoint, env: dict) -> tuple[Function, Replica]:
    """Two replicas on the store `env` names: the first through init_context (start-up check
    included), the second sharing its model with its own store and cache."""
    first = Function({**model_env(checkpoint), "SAM2_REDIS_TIMEOUT_SECONDS": "2", **env})
    return first, Replica(first)


def masks(answer: dict) -> list:
    return [answer_mask(shape, width=FRAME_W, height=FRAME_H) for shape in answer["shapes"]]


def session(pair, frames) -> list:
    """Track the first masks through every frame, the replicas taking turns; masks per frame."""
    answer = pair[0].track(frames[0], shapes=[mask_shape(m) for m in first_masks()])
    tracked = [masks(answer)]
    for i, frame in enumerate(frames[1:], start=1):
        answer = pair[i % 2].track(frame, states=answer["states"])
        tracked.append(masks(answer))
    return tracked


# --- TLS ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(str(tmp_path_factory.mktemp("certs")))


@pytest.fixture(scope="module")
def tls(certs):
    server = tls_server(certs)
    server.args += ("--bind", "127.0.0.1", "127.0.0.2")  # 127.0.0.2 is not in the certificate
    server.start()
    yield server
    server.close()


def tls_env(certs, port: int, *, ca: str = "ca.crt", host: str = "127.0.0.1") -> dict:
    return {
        "SAM2_REDIS_URL": f"rediss://{host}:{port}",
        "SAM2_REDIS_TLS_CA_FILE": certs[ca],
        "SAM2_REDIS_TLS_CERT_FILE": certs["client.crt"],
        "SAM2_REDIS_TLS_KEY_FILE": certs["client.key"],
    }


def test_tls_server_takes_only_clients_with_a_certificate(tls, certs):
    # Without this, the session test below could pass on a server that checks nothing.
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=tls.port, ssl=True, ssl_ca_certs=certs["ca.crt"], socket_timeout=2).ping()
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=tls.port, socket_timeout=2).ping()  # no TLS at all


def test_a_session_over_tls_across_two_replicas_gives_the_official_masks(checkpoint, tls, certs, frames, official):
    pair = replicas(checkpoint, tls_env(certs, tls.port))
    assert pair[0].context.user_data.service.store.kind == "redis"
    assert_same_masks(session(pair, frames), official)
    assert len(tls.client().keys(f"{PREFIX}*")) == len(first_masks())


def test_tls_files_alone_turn_tls_on_for_a_host_and_port(checkpoint, tls, certs):
    env = {k: v for k, v in tls_env(certs, tls.port).items() if k != "SAM2_REDIS_URL"}
    env.update(CVAT_FUNCTIONS_REDIS_HOST="127.0.0.1", CVAT_FUNCTIONS_REDIS_PORT=str(tls.port))
    first, _ = replicas(checkpoint, env)
    assert first.call(None, method="GET")[0] == 200


def test_a_key_inside_the_certificate_file_and_the_systems_cas_are_used(tls, certs, tmp_path):
    both = tmp_path / "client.pem"
    both.write_text(open(certs["client.crt"]).read() + open(certs["client.key"]).read())
    env = {"SAM2_REDIS_URL": f"rediss://127.0.0.1:{tls.port}", "SAM2_REDIS_TLS_CERT_FILE": str(both)}
    # No CA file: the system's trusted CAs, which OpenSSL takes from SSL_CERT_FILE when it is set.
    check = "from config import Settings; from state_store import RedisStore; import os, json; " \
            "RedisStore.from_settings(Settings.from_env(json.loads(os.environ['ENV']))).check()"
    run = lambda extra: subprocess.run(  # noqa: E731
        [sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "ENV": json.dumps(env), **extra},
    )
    trusted = run({"SSL_CERT_FILE": certs["ca.crt"]})
    assert trusted.returncode == 0, trusted.stderr
    untrusted = run({"SSL_CERT_FILE": certs["other-ca.crt"]})
    assert untrusted.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr


def test_a_wrong_ca_stops_the_start_up_with_one_line(tls, certs, caplog):
    error = start_up_failure(tls_env(certs, tls.port, ca="other-ca.crt"), caplog)
    assert "TLS handshake failed" in error and "CERTIFICATE_VERIFY_FAILED" in error
    assert "SAM2_REDIS_TLS_CA_FILE" in error


def test_a_missing_client_certificate_stops_the_start_up_with_one_line(tls, certs, caplog):
    env = {k: v for k, v in tls_env(certs, tls.port).items() if "CERT_FILE" not in k and "KEY_FILE" not in k}
    error = start_up_failure(env, caplog)
    assert "TLS handshake failed" in error


def test_an_unreadable_tls_file_stops_the_start_up_with_one_line(tls, certs, caplog, tmp_path):
    error = start_up_failure({**tls_env(certs, tls.port), "SAM2_REDIS_TLS_CA_FILE": str(tmp_path / "nope.pem")}, caplog)
    assert "SAM2_REDIS_TLS_CA_FILE" in error and "cannot be read" in error


def test_tls_on_one_side_only_warns_with_a_hint(tls, redis_server, certs, caplog):  # noqa: F811
    import main

    caplog.set_level(logging.WARNING, logger="nuclio_sdk")
    context = nuclio_sdk.Context(logger=nuclio_sdk.Logger(logging.DEBUG))
    for env, hint in [
        ({"SAM2_REDIS_URL": f"redis://127.0.0.1:{tls.port}"}, "use a rediss:// URL"),
        ({**tls_env(certs, redis_server.port), "SAM2_REDIS_TIMEOUT_SECONDS": "1"}, "use redis://"),
    ]:
        caplog.clear()
        settings = Settings.from_env(env)
        main._check_store(context, RedisStore.from_settings(settings), settings)  # warns, does not stop
        [record] = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert hint in record.__dict__["with"]["hint"]


def test_the_host_name_is_checked_against_the_certificate(tls, certs, caplog):
    error = start_up_failure(tls_env(certs, tls.port, host="127.0.0.2"), caplog)
    assert "TLS handshake failed" in error and "IP address mismatch" in error


# --- ACL user and password file ----------------------------------------------------------------

@pytest.fixture(scope="module")
def acl():
    server = acl_server(user="tracker", password="s3cret pass", prefix=PREFIX).start()
    yield server
    server.close()


def acl_env(acl, tmp_path, password: str = "s3cret pass", **extra) -> dict:
    secret = tmp_path / "password"
    secret.write_text(password + "\n")  # a file made with echo: its newline is not the password
    return {
        "CVAT_FUNCTIONS_REDIS_HOST": "127.0.0.1",
        "CVAT_FUNCTIONS_REDIS_PORT": str(acl.port),
        "CVAT_FUNCTIONS_REDIS_PASSWORD": "the file wins over this",
        "SAM2_REDIS_USERNAME": "tracker",
        "SAM2_REDIS_PASSWORD_FILE": str(secret),
        **extra,
    }


def test_an_acl_user_limited_to_the_stores_commands_and_prefix_serves_a_session(
    checkpoint, acl, tmp_path, frames, official
):
    pair = replicas(checkpoint, acl_env(acl, tmp_path))
    assert_same_masks(session(pair, frames), official)
    user = redis.Redis(port=acl.port, username="tracker", password="s3cret pass")
    with pytest.raises(redis.exceptions.NoPermissionError):
        user.get(f"{PREFIX}x")  # the user is limited, so the session above used nothing else
    with pytest.raises(redis.exceptions.NoPermissionError):
        user.hset("elsewhere", "f", "v")


@pytest.mark.parametrize("password, change, expected", [
    ("wrong", {}, "refused the user or password"),
    ("s3cret pass", {"SAM2_STATE_PREFIX": "other:"}, "may not run the store's commands on its keys"),
])
def test_wrong_credentials_or_prefix_stop_the_start_up_with_one_line(acl, tmp_path, caplog, password, change, expected):
    error = start_up_failure(acl_env(acl, tmp_path, password, **change), caplog)
    assert expected in error
    assert password not in error


def test_a_url_carries_the_user_and_a_percent_encoded_password_and_wins_over_the_host(acl):
    url = f"redis://tracker:s3cret%20pass@127.0.0.1:{acl.port}"
    env = {"SAM2_REDIS_URL": url, "CVAT_FUNCTIONS_REDIS_HOST": "nowhere.invalid"}
    store = RedisStore.from_settings(Settings.from_env(env))
    store.check()
    store.create("u", {"x": b"1"})
    assert store.read("u", ["x"]) == {"x": b"1"}
    assert "s3cret" not in store.where and "nowhere" not in store.where


def test_a_unix_socket_url(tmp_path):
    path = str(tmp_path / "redis.sock")
    server = RedisServer("--unixsocket", path, "--unixsocketperm", "700").start()
    try:
        store = RedisStore.from_settings(Settings.from_env({"SAM2_REDIS_URL": f"unix://{path}"}))
        store.check()
        store.create("u", {"x": b"1"})
        assert server.client().hget(PREFIX + "u", "x") == b"1"
    finally:
        server.close()


@pytest.mark.parametrize("missing", [c.lower() for c in COMMANDS if c not in ("PING", "DEL")])
def test_a_user_lacking_any_one_command_stops_the_start_up(acl, tmp_path, caplog, missing):
    grants = [f"+{c.lower()}" for c in COMMANDS if c.lower() != missing]
    acl.client().execute_command("ACL", "SETUSER", "partial", "reset", "on", ">pw", f"~{PREFIX}*", *grants)
    env = {**acl_env(acl, tmp_path), "SAM2_REDIS_USERNAME": "partial"}
    env["SAM2_REDIS_PASSWORD_FILE"] = str(tmp_path / "pw")
    (tmp_path / "pw").write_text("pw")
    error = start_up_failure(env, caplog)
    assert "may not run the store's commands" in error or "refused a command the function needs" in error


def test_an_unreadable_password_file_stops_the_start_up_with_one_line(tmp_path, caplog):
    env = {"CVAT_FUNCTIONS_REDIS_HOST": "127.0.0.1", "SAM2_REDIS_PASSWORD_FILE": str(tmp_path / "missing")}
    error = start_up_failure(env, caplog)
    assert "SAM2_REDIS_PASSWORD_FILE" in error and "cannot be read" in error


# --- Sentinel ----------------------------------------------------------------------------------

@pytest.fixture()
def sentinels():
    group = SentinelSet().start()
    yield group
    group.close()


def test_an_unknown_sentinel_master_stops_the_start_up_with_one_line(sentinels, caplog):
    error = start_up_failure({**sentinels.env(), "SAM2_REDIS_SENTINEL_MASTER": "nobody"}, caplog)
    assert "no Sentinel knows a master named 'nobody'" in error


def test_a_sentinel_failover_mid_session_gives_503_then_the_official_masks(checkpoint, sentinels, frames, official):
    pair = replicas(checkpoint, sentinels.env())
    assert pair[0].context.user_data.service.store.kind == "redis-sentinel"
    old_master = sentinels.master.port
    answer = pair[0].track(frames[0], shapes=[mask_shape(m) for m in first_masks()])
    tracked, statuses, lost, recovered_s = [masks(answer)], [], 0, None
    i = 1
    deadline = time.monotonic() + 90
    while i < len(frames):
        assert time.monotonic() < deadline, f"no recovery; statuses {statuses}"
        if i == 3 and sentinels.master.proc is not None:
            sentinels.master.proc.send_signal(signal.SIGKILL)
            sentinels.master.proc.wait()
            sentinels.master.proc = None
            killed = time.monotonic()
        status, reply = pair[i % 2].call(body(frames[i], states=answer["states"]))
        statuses.append(status)
        if status == 200:
            if recovered_s is None and i >= 3:
                recovered_s = time.monotonic() - killed
            answer = reply
            tracked.append(masks(answer))
            i += 1
        elif status in (409, 410):  # lost to asynchronous replication: start again from the prompt
            lost += 1
            answer = pair[0].track(frames[0], shapes=[mask_shape(m) for m in first_masks()])
            tracked, i = [masks(answer)], 1
        else:
            assert status == 503, reply
            assert "state store" in reply["error"] and "retry" in reply["error"]
            time.sleep(0.2)
    # Every 200 equals the official mask of its frame: the last pass covers every frame.
    assert_same_masks(tracked, official)
    assert sentinels.current_master_port() != old_master
    assert statuses.count(503) >= 1, statuses  # the kill was seen, and answered 503
    print(f"\nSentinel failover: {statuses.count(503)} answers 503, {lost} states lost, "
          f"first 200 after {recovered_s:.1f} s (down-after-milliseconds 1000)")
    assert recovered_s < 30


@pytest.mark.parametrize("cluster_mode", ["false", "true"])
def test_an_unreachable_store_at_start_up_only_warns_and_requests_answer_503(checkpoint, caplog, cluster_mode):
    caplog.set_level(logging.WARNING, logger="nuclio_sdk")
    env = {"CVAT_FUNCTIONS_REDIS_HOST": "127.0.0.1", "CVAT_FUNCTIONS_REDIS_PORT": str(free_port()),
           "SAM2_REDIS_TIMEOUT_SECONDS": "1", "SAM2_REDIS_CLUSTER": cluster_mode}
    function = Function({**model_env(checkpoint), **env})  # starts: the store may come back
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["state store unreachable at start-up; requests answer 503 until it is back"]
    status, answer = function.call(None, method="GET")
    assert status == 503 and "state store" in answer["error"]


def test_a_read_only_replica_stops_the_start_up_with_one_line(redis_server, caplog):  # noqa: F811
    replica = RedisServer("--replicaof", "127.0.0.1", str(redis_server.port)).start()
    try:
        env = {"CVAT_FUNCTIONS_REDIS_HOST": "127.0.0.1", "CVAT_FUNCTIONS_REDIS_PORT": str(replica.port)}
        assert "read-only replica" in start_up_failure(env, caplog)
    finally:
        replica.close()


def test_writes_lost_to_asynchronous_replication_get_409_or_410_never_a_wrong_mask(
    function, redis_server, frames, official  # noqa: F811
):
    """What a failover loses: the new master lacks the last writes. Made exact here by putting an
    object's hash back as it was one frame earlier and dropping another's altogether."""
    replica = Replica(function, redis_host="127.0.0.1", redis_port=redis_server.port)
    admin = redis_server.client()
    answers = [replica.track(frames[0], shapes=[mask_shape(m) for m in first_masks()])]
    for i in range(1, 4):
        answers.append(replica.track(frames[i], states=answers[-1]["states"]))
    first, second = (PREFIX + state["id"] for state in answers[-1]["states"])
    before = admin.hgetall(first)  # frame 3 written, frame 4 not yet
    answers.append(replica.track(frames[4], states=answers[3]["states"]))
    admin.delete(first, second)
    admin.hset(first, mapping=before)
    admin.expire(first, 60)

    status, reply = replica.call(body(frames[5], states=answers[4]["states"]))
    assert status == 409, reply  # the first object's error: behind the state CVAT holds
    assert reply["error"].startswith("states[0]:") and "re-initialize" in reply["error"]
    status, reply = replica.call(body(frames[5], states=answers[4]["states"][1:]))
    assert status == 410 and "re-initialize" in reply["error"], reply  # lost altogether
    # Frame 4 again for the rewound object: recomputed from frame 3, the official mask again.
    again = replica.track(frames[4], states=answers[3]["states"][:1])
    assert official[4][0].any() and np.array_equal(masks(again)[0], official[4][0])


# --- Cluster -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    nodes = Cluster().start()
    yield nodes
    nodes.close()


def test_a_session_on_a_cluster_across_two_replicas_gives_the_official_masks(checkpoint, cluster, frames, official):
    pair = replicas(checkpoint, cluster.env())
    assert pair[0].context.user_data.service.store.kind == "redis-cluster"
    assert_same_masks(session(pair, frames), official)
    for box in ([10, 10, 40, 40], [50, 20, 90, 60], [70, 70, 120, 100], [5, 60, 35, 95]):
        pair[1].track(frames[0], shapes=[{"type": "rectangle", "points": box}])
    client = cluster.client()
    keys = [k for node in cluster.nodes for k in node.client().keys(f"{PREFIX}*")]
    assert len(keys) == len(first_masks()) + 4
    slots = {client.keyslot(k) for k in keys}
    assert len(slots) > 1  # one hash per object: objects spread over the cluster


# --- What each topology sends ------------------------------------------------------------------

def commands_run(ports: list) -> dict:
    """Commands each server has run so far, by name, from INFO commandstats."""
    counts = collections.Counter()
    for port in ports:
        for name, stats in redis.Redis(port=port, socket_timeout=5).info("commandstats").items():
            counts[name.removeprefix("cmdstat_").upper()] += stats["calls"]
    return counts


def store_workout(store: RedisStore) -> None:
    """Every kind of call the tracker makes: the start-up check, create, read, commit, delete."""
    store.check()
    for i in range(4):
        store.create(f"s{i}", {"s:0": b"t0", "m:0": b"memory"})
        store.read(f"s{i}", ["s:0", "m:0"])
        store.commit(f"s{i}", guard=("s:1", b"t1"), put={"m:1": b"memory"}, delete=["m:0"])
    store.delete(*(f"s{i}" for i in range(4)))


def sent(before: dict, after: dict) -> set:
    return {name for name, calls in after.items() if calls > before.get(name, 0)} - {"INFO"}  # INFO: ours


def test_sentinel_and_cluster_clients_send_only_the_listed_commands(cluster):
    # Sentinel: the data nodes take only the store's commands from the store's user (the
    # Sentinels and the replica talk to the master too, so counting commands there would not do).
    group = SentinelSet("tracked", *store_user("tracker", "pw", PREFIX)).start()
    try:
        env = {**group.env(), "SAM2_REDIS_USERNAME": "tracker", "CVAT_FUNCTIONS_REDIS_PASSWORD": "pw"}
        store_workout(RedisStore.from_settings(Settings.from_env(env)))
    finally:
        group.close()

    # Cluster (no replicas, no Sentinels): what the nodes ran is what the client sent.
    nodes = [node.port for node in cluster.nodes]
    before = commands_run(nodes)
    store_workout(RedisStore.from_settings(Settings.from_env(cluster.env())))
    assert sent(before, commands_run(nodes)) == set(COMMANDS) | set(CLUSTER_COMMANDS)


class Interrupted(RedisStore):
    """A store whose next commit runs `meanwhile()` between its check and its write."""

    meanwhile = None

    def _watched(self, key, names, decide):
        def interrupted(*values):
            commands = decide(*values)
            if self.meanwhile is not None:
                meanwhile, self.meanwhile = self.meanwhile, None
                meanwhile()
            return commands

        return super()._watched(key, names, interrupted)


def test_a_cluster_commit_cut_off_after_another_replicas_write_leaves_that_write(cluster):
    env = Settings.from_env({**cluster.env(), "SAM2_REDIS_TIMEOUT_SECONDS": "2"})
    store, other = Interrupted.from_settings(env), RedisStore.from_settings(env)
    store.create("cut", {"s:0": b"t0"})

    def overtaken_then_cut_off():
        other.commit("cut", guard=("s:1", b"theirs"), put={"m:1": b"theirs"})
        for node in cluster.nodes:  # every connection but this admin one: ours holds the WATCH
            node.client().execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")

    store.meanwhile = overtaken_then_cut_off
    with pytest.raises(StoreUnavailable):  # not retried without its WATCH, which would overwrite
        store.commit("cut", guard=("s:1", b"mine"), put={"m:1": b"mine"})
    assert cluster.client().hmget(PREFIX + "cut", ["s:1", "m:1"]) == [b"theirs", b"theirs"]


def test_a_commit_follows_its_slot_to_another_node(cluster):
    store = RedisStore.from_settings(Settings.from_env(cluster.env()))
    store.create("moving", {"s:0": b"t0"})
    cluster.move_slot_of(PREFIX + "moving")
    with pytest.raises(StoreUnavailable, match="slot moved"):  # the first try meets the move
        store.commit("moving", guard=("s:1", b"t1"), put={})
    assert store.commit("moving", guard=("s:1", b"t1"), put={}) is True  # the retry finds the node
    assert store.read("moving", ["s:0", "s:1"]) == {"s:0": b"t0", "s:1": b"t1"}


def test_cluster_mode_set_wrong_either_way_stops_the_start_up_with_one_line(cluster, redis_server, caplog):  # noqa: F811
    for node in cluster.nodes:  # each node, whichever slots the start-up check's keys fall in
        env = {"CVAT_FUNCTIONS_REDIS_HOST": "127.0.0.1", "CVAT_FUNCTIONS_REDIS_PORT": str(node.port)}
        assert "set SAM2_REDIS_CLUSTER=true" in start_up_failure(env, caplog)
        caplog.clear()
    env = {"SAM2_REDIS_URL": f"redis://127.0.0.1:{redis_server.port}", "SAM2_REDIS_CLUSTER": "true"}
    assert "unset SAM2_REDIS_CLUSTER" in start_up_failure(env, caplog)
