"""The embedded store's contract: write-once fields, guarded commits, TTL refreshed on use."""

import pytest

from errors import StateConflict, StateNotFound
from state_store import EmbeddedStore


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_read_returns_only_existing_fields():
    store = EmbeddedStore(ttl_s=10, max_bytes=2**20)
    store.create("a", {"x": b"1"})
    assert store.read("a", ["x", "y"]) == {"x": b"1"}


def test_commit_writes_puts_and_deletes_atomically():
    store = EmbeddedStore(ttl_s=10, max_bytes=2**20)
    store.create("a", {"x": b"1", "old": b"0"})
    assert store.commit("a", guard=("g", b"t1"), put={"y": b"2"}, delete=["old"]) is True
    assert store.read("a", ["x", "y", "g", "old"]) == {"x": b"1", "y": b"2", "g": b"t1"}


def test_commit_with_the_same_guard_is_a_no_op_and_another_guard_conflicts():
    store = EmbeddedStore(ttl_s=10, max_bytes=2**20)
    store.create("a", {})
    store.commit("a", guard=("g", b"t1"), put={"y": b"2"})
    assert store.commit("a", guard=("g", b"t1"), put={"y": b"other"}) is False
    assert store.read("a", ["y"]) == {"y": b"2"}
    with pytest.raises(StateConflict):
        store.commit("a", guard=("g", b"t2"), put={"y": b"3"})


def test_sessions_expire_unless_used():
    clock = Clock()
    store = EmbeddedStore(ttl_s=10, max_bytes=2**20, clock=clock)
    store.create("a", {"x": b"1"})
    store.create("b", {"x": b"1"})
    clock.now = 8
    store.read("a", ["x"])  # refreshes a only
    clock.now = 15
    assert store.read("a", ["x"]) == {"x": b"1"}
    with pytest.raises(StateNotFound):
        store.read("b", ["x"])
    with pytest.raises(StateNotFound):
        store.commit("b", guard=("g", b"t"), put={})


def test_least_recently_used_sessions_are_dropped_past_the_byte_bound():
    store = EmbeddedStore(ttl_s=10, max_bytes=2500)
    for session in "abc":
        store.create(session, {"x": bytes(1000)})  # c pushes the total past the bound
    with pytest.raises(StateNotFound):
        store.read("a", ["x"])
    store.read("b", ["x"])  # b is now the most recently used
    store.create("d", {"x": bytes(1000)})
    with pytest.raises(StateNotFound):
        store.read("c", ["x"])
    assert store.read("b", ["x"]) and store.read("d", ["x"])


def test_creating_an_existing_session_again_counts_its_bytes_once():
    store = EmbeddedStore(ttl_s=10, max_bytes=2500)
    store.create("a", {"x": bytes(1000)})
    store.create("b", {"x": bytes(1000)})
    for _ in range(5):
        store.create("b", {"x": bytes(1000)})  # a retried start: replaced, not added
    assert store.read("a", ["x"]) and store.read("b", ["x"])  # 2000 bytes held, under the bound


def test_deleted_sessions_are_gone_and_free_their_bytes():
    store = EmbeddedStore(ttl_s=10, max_bytes=2500)
    store.create("a", {"x": bytes(1000)})
    store.create("b", {"x": bytes(1000)})
    store.delete("b")
    store.delete("nothing")  # deleting an unknown session is no error
    with pytest.raises(StateNotFound):
        store.read("b", ["x"])
    store.create("c", {"x": bytes(1000)})
    assert store.read("a", ["x"]) and store.read("c", ["x"])
