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


def test_an_entry_used_within_the_linger_time_stays_until_it_has_been_idle_that_long():
    store, clock, evicted = filled(capacity=200, linger_s=1.0)
    add(store, "a")
    add(store, "b")
    clock.t += 5
    store.unpin(store.acquire("a"))
    store.unpin(store.acquire("b"))  # both just used: their clients' next requests are coming
    with pytest.raises(StoreFull):
        store.reserve(100)
    assert evicted == [] and not store.room_for(100)
    clock.t += 1.5
    store.reserve(100)
    assert evicted == ["a"]


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


def test_key_folder_is_bounded_atomic_and_discards_what_it_cannot_trust(tmp_path):
    """The serialized tier: least recently used key sets go past the bound (never one in
    memory), the files are named by the key id's hash, and a restart keeps every complete key
    set while partial or corrupt files are discarded and reported."""
    from engine.serve.keyvault import KeyVault, name_of

    reported = []
    vault = KeyVault(tmp_path, 250, on_discard=lambda name, why: reported.append(why))
    names = [name_of(f"key-{i}") for i in range(3)]
    for i, n in enumerate(names[:2]):
        assert vault.put(n, bytes([i]) * 100, "circuit", "alice") == []
        time.sleep(0.01)
    assert "key-0" not in "".join(p.name for p in tmp_path.iterdir())  # no key id on disk
    vault.read(names[0])  # key-0 is now the most recently used
    assert vault.put(names[2], b"\x02" * 100, "circuit", "bob", in_use=lambda n: False) == [names[1]]
    assert names[1] not in vault and vault.read(names[1]) is None and vault.used_bytes == 200
    # the least recently used one is in memory: the next one goes instead
    assert vault.put(name_of("key-3"), b"\x03" * 100, "circuit", "bob", in_use=lambda n: n == names[2]) == [names[0]]
    assert vault.count("bob") == 2 and vault.count("alice") == 0
    with pytest.raises(ValueError):
        vault.put(name_of("huge"), b"x" * 251, "circuit", "bob")
    # restart: complete key sets are back, in the same order of use
    again = KeyVault(tmp_path, 250)
    assert [n for n, _ in again.recent()] == [name_of("key-3"), names[2]]
    assert again.read(names[2])[0] == b"\x02" * 100 and again.entry(names[2]).tenant == "bob"
    # corrupt bytes, a key file without its description, an unfinished write
    keys = tmp_path / f"{names[2]}.keys"
    keys.write_bytes(b"\x07" * 100)
    (tmp_path / f"{name_of('orphan')}.keys").write_bytes(b"x")
    (tmp_path / ".x.keys.tmp").write_bytes(b"x")
    (tmp_path / f"{name_of('short')}.json").write_text('{"circuit": "c", "tenant": "t", "nbytes": 9, "sha256": "", "created": 0}')
    third = KeyVault(tmp_path, 250, on_discard=lambda name, why: reported.append(why))
    assert len(third) == 2 and third.discarded == 3
    assert third.read(names[2]) is None and names[2] not in third and not keys.exists()
    assert third.discarded == 4 and any("SHA-256" in r for r in reported)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{name_of('key-3')}.{ext}" for ext in ("json", "keys"))
    temporary = KeyVault(None, 100)
    folder = temporary.folder
    temporary.put(name_of("k"), b"k", "c", "t")
    temporary.close()
    assert not folder.exists()


def test_placement_takes_the_worker_with_the_most_free_budget_then_the_least_load():
    from engine.serve.placement import Placement

    dropped = []
    p = Placement(300, on_evict=lambda name, e: dropped.append((name, e.value)), grace_s=0.0)
    for w in ("a", "b"):
        p.add_worker(w)

    def place(name, avoid=None):
        slot = p.reserve(100, avoid=avoid) if avoid else p.reserve(100)
        slot.put(name, slot.name, 100, owner="c")  # the entry's value is its worker, as with Dask
        return slot.name

    first = place("k1")
    assert place("k2") != first  # the other worker has more room
    pinned = p.acquire("k1")  # a run in flight on k1's worker
    assert place("k3") != first  # equal room: the worker without a run in flight
    p.unpin(pinned)
    assert sorted(len(p.store_of(w)) for w in ("a", "b")) == [1, 2] and len(p) == 3
    assert p.where("k2") != p.where("k1") and p.capacity == 600 and p.used_bytes == 300
    # a worker that leaves takes its entries, without a drop (its memory is gone)
    lost = p.remove_worker(p.where("k3"))
    assert {name for name, _ in lost} >= {"k3"} and "k3" not in p and dropped == []
    assert p.left and p.workers() == [w for w in ("a", "b") if w not in p.left]
    # full: the idle least recently used entry on the remaining worker goes, and is dropped there
    for k in range(4, 7):
        place(f"k{k}")
    assert len(p) == 3 and dropped and all(value == p.workers()[0] for _, value in dropped)
    p.remove_worker(p.workers()[0])
    with pytest.raises(StoreFull, match="no worker"):
        p.reserve(100)
    with pytest.raises(ValueError):
        Placement(300).reserve(400)
