"""Production Redis set-ups on loopback, made of Debian's redis-server: TLS with client
certificates, an ACL user, Sentinels with a replica, and a three-master Cluster.

Each `start()`s and `close()`s its processes; `env()` is what the function is given to reach it.
"""

import os
import shutil
import subprocess
import tempfile
import time

import pytest
import redis

from redis_client import COMMANDS
from redis_server import RedisServer, free_port


# --- TLS ---------------------------------------------------------------------------------------

def make_certificates(directory: str) -> dict:
    """A CA, a server certificate for 127.0.0.1 and localhost, a client certificate, and a second
    CA that signed neither (for the wrong-CA test); paths by name."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed")
    path = lambda name: os.path.join(directory, name)  # noqa: E731
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    for ca in ("ca", "other-ca"):
        run("req", "-x509", *key, "-keyout", path(f"{ca}.key"), "-out", path(f"{ca}.crt"), "-days", "2",
            "-subj", f"/CN=test {ca}")
    for name, extension in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "extendedKeyUsage=clientAuth")):
        with open(path(f"{name}.ext"), "w") as f:
            f.write(extension + "\n")
        run("req", *key, "-keyout", path(f"{name}.key"), "-out", path(f"{name}.csr"), "-subj", f"/CN={name}")
        run("x509", "-req", "-in", path(f"{name}.csr"), "-CA", path("ca.crt"), "-CAkey", path("ca.key"),
            "-CAcreateserial", "-out", path(f"{name}.crt"), "-days", "2", "-extfile", path(f"{name}.ext"))
    return {name: path(name) for name in os.listdir(directory)}


def tls_server(certs: dict) -> RedisServer:
    """TLS only (no plain port), client certificates required."""
    port = free_port()
    return RedisServer(
        "--port", "0", "--tls-port", str(port),
        "--tls-cert-file", certs["server.crt"], "--tls-key-file", certs["server.key"],
        "--tls-ca-cert-file", certs["ca.crt"], "--tls-auth-clients", "yes",
        port=port,
        client_options={
            "ssl": True, "ssl_ca_certs": certs["ca.crt"],
            "ssl_certfile": certs["client.crt"], "ssl_keyfile": certs["client.key"],
        },
    )


# --- ACL ---------------------------------------------------------------------------------------

def acl_server(*, user: str, password: str, prefix: str) -> RedisServer:
    """The default user off; `user` limited to the store's commands on `prefix*`; an admin for
    the test itself."""
    # What the store sends and nothing else (AUTH needs no grant); tests/test_redis_tracking.py
    # shows with MONITOR that a session sends exactly these.
    return RedisServer(
        "--user", "default", "off",
        *store_user(user, password, prefix),
        "--user", "admin", "on", ">admin", "~*", "&*", "+@all",
        client_options={"username": "admin", "password": "admin"},
    )


def store_user(user: str, password: str, prefix: str) -> tuple:
    """redis-server arguments for an ACL user that may send the store's commands on `prefix*`,
    and nothing else; one argument per rule, as redis-server splits nothing."""
    return ("--user", user, "on", f">{password}", "resetkeys", f"~{prefix}*", "-@all",
            *(f"+{command.lower()}" for command in COMMANDS))


# --- Sentinel ----------------------------------------------------------------------------------

class _ServerGroup:
    """Processes started together: `start()` runs the subclass's `_start()`, and closes whatever
    it had started if it fails, so that no process is left behind."""

    def start(self):
        try:
            return self._start()
        except BaseException:
            self.close()
            raise


class SentinelSet(_ServerGroup):
    """A master, one replica, and three Sentinels watching them as `name`."""

    def __init__(self, name: str = "tracked", *data_node_args: str):
        """`data_node_args`: more redis-server arguments for the master and the replica."""
        self.name = name
        self.master = RedisServer(*data_node_args)
        self.replica = RedisServer(*data_node_args)
        self.sentinels: list[subprocess.Popen] = []
        self.sentinel_ports = [free_port() for _ in range(3)]
        self._dir = tempfile.mkdtemp(prefix="redis-sentinel-test-")

    def _start(self) -> "SentinelSet":
        self.master.start()
        self.replica.args += ("--replicaof", "127.0.0.1", str(self.master.port))
        self.replica.start()
        for port in self.sentinel_ports:
            conf = os.path.join(self._dir, f"sentinel-{port}.conf")
            with open(conf, "w") as f:  # Sentinels rewrite their file: one each
                f.write(
                    f"port {port}\nbind 127.0.0.1\ndir {self._dir}\n"
                    f"sentinel monitor {self.name} 127.0.0.1 {self.master.port} 2\n"
                    f"sentinel down-after-milliseconds {self.name} 1000\n"
                    f"sentinel failover-timeout {self.name} 10000\n"
                    f"sentinel parallel-syncs {self.name} 1\n"
                )
            self.sentinels.append(subprocess.Popen(
                ["redis-server", conf, "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            ))
        self._wait(lambda: all(self._sees_replica(port) for port in self.sentinel_ports), "Sentinels to see the replica")
        return self

    def _sees_replica(self, port: int) -> bool:
        try:
            client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
            # Raw: redis-py 6.4's sentinel_master() fails to parse its reply outside Sentinel().
            reply = client.execute_command("SENTINEL", "MASTER", self.name)
            master = dict(zip(reply[::2], reply[1::2]))
            return master[b"num-slaves"] == b"1" and master[b"num-other-sentinels"] == b"2"
        except redis.RedisError:
            return False

    @staticmethod
    def _wait(ready, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.1)

    def current_master_port(self) -> int:
        client = redis.Redis(host="127.0.0.1", port=self.sentinel_ports[0], socket_timeout=2)
        return int(client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)[1])

    def env(self) -> dict:
        return {
            "SAM2_REDIS_SENTINELS": ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports),
            "SAM2_REDIS_SENTINEL_MASTER": self.name,
        }

    def close(self) -> None:
        for proc in self.sentinels:
            proc.kill()
            proc.wait()
        self.master.close()
        self.replica.close()
        shutil.rmtree(self._dir, ignore_errors=True)


# --- Cluster -----------------------------------------------------------------------------------

class Cluster(_ServerGroup):
    """Three masters, no replicas, every slot covered (`redis-cli --cluster create`)."""

    def __init__(self):
        # The cluster bus listens on port + 10000.
        self.nodes = [RedisServer("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                  port=_port_below(55536)) for _ in range(3)]

    def _start(self) -> "Cluster":
        for node in self.nodes:
            node.start()
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes), "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )
        SentinelSet._wait(self._ready, "the cluster to cover every slot")
        return self

    def _ready(self) -> bool:
        return all(node.client().cluster("info").get("cluster_state") == "ok" for node in self.nodes)

    def move_slot_of(self, key: str) -> None:
        """Move the slot holding `key`, with its keys, to another node, as a resharding does."""
        slot = self.client().keyslot(key)
        ids = {node.port: node.client().execute_command("CLUSTER", "MYID").decode() for node in self.nodes}
        source = next(n for n in self.nodes if any(
            s[0] <= slot <= s[1] for s in _slot_ranges(n.client(), ids[n.port])))
        target = next(n for n in self.nodes if n is not source)
        target.client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source.port])
        source.client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target.port])
        for moving in source.client().execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000):
            source.client().execute_command("MIGRATE", "127.0.0.1", target.port, moving, 0, 5000)
        for node in self.nodes:
            node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target.port])

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host="127.0.0.1", port=self.nodes[0].port, socket_timeout=10)

    def env(self) -> dict:
        return {"SAM2_REDIS_URL": f"redis://127.0.0.1:{self.nodes[0].port}", "SAM2_REDIS_CLUSTER": "true"}

    def close(self) -> None:
        for node in self.nodes:
            node.close()


def _port_below(limit: int) -> int:
    while True:
        port = free_port()
        if port < limit:
            return port


def _slot_ranges(client: redis.Redis, node_id: str) -> list:
    """The (first, last) slot ranges `node_id` serves, from CLUSTER SLOTS."""
    return [(entry[0], entry[1]) for entry in client.execute_command("CLUSTER", "SLOTS")
            if entry[2][2].decode() == node_id]
