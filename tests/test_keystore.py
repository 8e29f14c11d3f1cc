"""The key store's rules on plain objects: LRU, pins, grace, all-or-nothing eviction, waiting, TTL."""

import threading
import time

import pytest

from engine.serve.keystore import KeyStore, StoreFull


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def filled(capacity=300, grace=0.0, **kw):
    clock = Clock()
    evicted = []
    store = KeyStore(capacity, grace_s=grace, clock=clock, on_evict=lambda k, e: evicted.append(k), **kw)
    return store, clock, evicted


def add(store, key, n=100):
    store.reserve(n)
    store.put(key, object(), n, owner="c")


def test_least_recently_used_goes_first():
    store, clock, evicted = filled()
    for k in "abc":
        add(store, k)
        clock.t += 1
    store.unpin(store.acquire("a"))  # a is now the most recently used
    add(store, "d")
    assert evicted == ["b"] and "a" in store and store.used_bytes == 300


def test_pinned_and_new_entries_are_spared_and_nothing_is_evicted_for_nothing():
    store, clock, evicted = filled(grace=10.0)
    add(store, "a")
    add(store, "b")
    entry = store.acquire("a")  # in use
    add(store, "c", 50)
    with pytest.raises(StoreFull):
        store.reserve(100)  # b is new and unused (grace), a is pinned: no room
    assert evicted == [] and len(store) == 3  # a failed reservation evicts nothing
    clock.t += 11  # b's grace is over
    store.reserve(100)
    assert evicted == ["b"]
    store.unpin(entry)


def test_a_waiting_reservation_gets_the_room_an_entry_gives_up():
    store = KeyStore(200, grace_s=0.0)
    store.reserve(100)
    store.put("a", object(), 100, "c")
    store.reserve(100)
    store.put("b", object(), 100, "c")
    ea, eb = store.acquire("a"), store.acquire("b")
    threading.Timer(0.3, store.unpin, args=(ea,)).start()
    t0 = time.monotonic()
    store.reserve(100, wait_s=5.0)
    assert 0.2 < time.monotonic() - t0 < 5.0 and "a" not in store and "b" in store
    store.unpin(eb)


def test_idle_entries_expire():
    store, clock, evicted = filled(ttl_s=60.0)
    add(store, "a")
    clock.t += 61
    assert store.acquire("a") is None and evicted == ["a"]


def test_one_set_larger_than_the_store_is_refused():
    store, *_ = filled(capacity=100)
    with pytest.raises(ValueError, match="holds"):
        store.reserve(101)
