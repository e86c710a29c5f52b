"""What goes on the wire when the function connects, seen by a listener that speaks just enough
RESP to answer like Kvrocks 2.7, CVAT's Redis, which is not packaged for Debian: `AUTH pass` is
accepted, `AUTH user pass` gets a bare "wrong number of arguments", and there is no HELLO."""

import socket
import threading

import hiredis
import pytest

from config import Settings
from state_store import RedisStore
from support import start_up_failure


class KvrocksAuth:
    """Records every command; answers AUTH, PING and DEL as Kvrocks 2.7 would (enough for a
    connection; the start-up check's other commands get an error)."""

    def __init__(self):
        self.commands: list[list[bytes]] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn):
        reader = hiredis.Reader()
        with conn:
            while data := conn.recv(65536):
                reader.feed(data)
                while (command := reader.gets()) is not False:
                    self.commands.append(command)
                    conn.sendall(self._answer(command))

    @staticmethod
    def _answer(command) -> bytes:
        name = command[0].upper()
        if name == b"AUTH":
            return b"+OK\r\n" if len(command) == 2 else b"-ERR wrong number of arguments\r\n"
        return {b"PING": b"+PONG\r\n", b"DEL": b":0\r\n"}.get(name, b"-ERR unknown command\r\n")

    def close(self):
        self._listener.close()


@pytest.fixture
def kvrocks():
    server = KvrocksAuth()
    yield server
    server.close()


def test_without_a_username_only_the_password_is_sent_and_nothing_but_resp2(kvrocks):
    settings = Settings(redis_host="127.0.0.1", redis_port=kvrocks.port, redis_password="pw", redis_timeout_s=2)
    store = RedisStore.from_settings(settings)
    store.ping()
    store.delete("a")
    assert kvrocks.commands[0] == [b"AUTH", b"pw"]  # one argument: what Kvrocks 2.7 takes
    names = {c[0].upper() for c in kvrocks.commands}
    assert names == {b"AUTH", b"PING", b"DEL"}  # no HELLO (RESP3), no CLIENT SETINFO, no SELECT


def test_a_username_on_kvrocks_stops_the_start_up_naming_the_variable(kvrocks, caplog):
    env = {
        "CVAT_FUNCTIONS_REDIS_HOST": "127.0.0.1", "CVAT_FUNCTIONS_REDIS_PORT": str(kvrocks.port),
        "CVAT_FUNCTIONS_REDIS_PASSWORD": "pw", "SAM2_REDIS_USERNAME": "default",
    }
    error = start_up_failure(env, caplog)
    assert "unset SAM2_REDIS_USERNAME" in error
    assert [b"AUTH", b"default", b"pw"] in kvrocks.commands
