"""Key sets a dashboard keeps for its visitors: a pool of spare clients made ahead of demand
(:class:`KeyPool`) and the app's one shared key set, kept across restarts (:class:`SharedKeys`).
No Streamlit here: a bench drives them as the app does."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from pathlib import Path

from engine.serve.client import EncryptedClient, ServiceUnavailable
from engine.serve.keymaker import KeyMakerProcess


class KeyPool:
    """Spare clients of one circuit, keys generated and uploaded ahead of demand.

    A visitor's first encrypted answer should not wait for key generation (about 3 s) and the
    first run with new keys (about 1.5 s): the pool keeps ``spares`` clients whose keys are
    generated, uploaded and warmed by the service, each holding only its secret keys (about
    40 KB). :meth:`take` hands one out (each set goes to exactly one user, never back) and a
    background thread makes the next one.
    """

    def __init__(self, transport_factory, circuit_id: str, folder: Path, spares: int = 4, makers: int = 2,
                 quiet_s: float = 20.0, apart: bool | None = None, log: Path | None = None):
        import threading

        self._factory = transport_factory
        # Over HTTP, keys are made in key-maker processes (:class:`KeyMakerProcess`): key generation then
        # never holds this process's GIL, and the evaluation keys go to the service from there.
        probe = transport_factory()
        self._urls = list(getattr(probe, "urls", []) or [])
        self.apart = bool(self._urls) if apart is None else apart
        self._makers = []
        if self.apart:
            self._makers = [KeyMakerProcess(log=log) for _ in range(makers)]
        self.circuit_id = circuit_id
        self.folder = Path(folder)
        self.spares = spares
        self._ready: list[EncryptedClient] = []
        self._cond = threading.Condition()
        self._wanted = 0
        self._making = 0
        self.quiet_s = quiet_s  # refill only this long after the last hand-out, unless someone waits
        self._last_take = 0.0
        self.error: str | None = None
        self._closed = False
        # Two makers: key generation runs on one core each, uploads and warm-ups overlap.
        self._threads = [threading.Thread(target=self._fill, args=(i,), name=f"key-pool-{i}", daemon=True)
                         for i in range(makers)]
        for t in self._threads:
            t.start()

    def _make(self, i: int) -> EncryptedClient:
        if not self.apart:
            client = EncryptedClient.download(self._factory(), self.circuit_id, self.folder)
            client.register()  # generates keys, uploads them, keeps only the secret keys
            return client
        made = self._makers[i].make(self._urls, self.circuit_id, self.folder)
        return EncryptedClient.from_keys(self._factory(), self.circuit_id, self.folder, made["secret_keyset"],
                                         made["key_ids"], made["evaluation_key_bytes"], made["keygen_s"],
                                         made["upload_s"])

    def close(self) -> None:
        """Stop the key makers and drop the spare key sets on the service (nobody holds their
        secret keys after this process: a service with a key folder would keep them for nothing)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for m in self._makers:
            m.stop(wait_s=0)  # spare keys are not worth waiting for: a stopping app would wait seconds
        with self._cond:
            spares, self._ready = self._ready, []
        for client in spares:
            client.close()

    def _fill(self, i: int) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    enough = len(self._ready) + self._making >= self.spares + self._wanted
                    # A visitor who just got keys is about to ask for a prediction: key generation
                    # and the service's warm-up would compete with it for the cores.
                    busy = not self._wanted and time.monotonic() - self._last_take < self.quiet_s
                    if not enough and not busy:
                        break
                    self._cond.wait(timeout=0.5 if busy else None)
                self._making += 1
            try:
                client = self._make(i)
                self.error = None
            except Exception as exc:  # noqa: BLE001 - reported to whoever takes
                self.error = f"{type(exc).__name__}: {exc}"
                client = None
            with self._cond:
                self._making -= 1
                if client is not None and self._closed:  # made while closing: nobody will take it
                    client.close()
                    client = None
                    return
                if client is not None:
                    self._ready.append(client)
                self._cond.notify_all()
            if client is None:
                time.sleep(2.0)

    def take(self, timeout_s: float = 300.0) -> EncryptedClient:
        """A client with fresh keys of its own, waiting for one if none is spare."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._wanted += 1
            self._cond.notify_all()
            try:
                while not self._ready:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise ServiceUnavailable(f"no keys ready in {timeout_s:.0f} s" + (f": {self.error}" if self.error else ""))
                    self._cond.wait(min(left, 1.0))
                client = self._ready.pop(0)
                self._last_take = time.monotonic()
            finally:
                self._wanted -= 1
            self._cond.notify_all()
        return client


class SharedKeys:
    """One key set of a circuit that a caller shares between its users, kept across restarts.

    The dashboard answers a session's first predictions with it while that session's own keys
    are made (a key generation, an upload and the service's first run: seconds). On disk, in
    ``folder/<circuit>/shared-keys.json`` (mode 600), are the secret keys (about 40 KB) and the
    key id: after a restart against a service that kept its key folder (``serve --key-dir``),
    the first answer needs no key generation at all. If the service no longer knows the key id,
    the client derives the evaluation keys again from the same secret keys and uploads them.
    Runs are serialized (:attr:`lock`): one key set never runs twice at once.
    """

    FILE = "shared-keys.json"

    def __init__(self, transport, circuit_id: str, folder: Path, client_zip: Path | None = None,
                 maker: KeyMakerProcess | None = None):
        """``client_zip``: the circuit's, when the caller has it (a shipped circuit): the keys are
        then made while the service starts. ``maker``: a key maker started earlier (stopped here)."""
        self.lock = threading.Lock()
        self.path = Path(folder) / circuit_id / self.FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if client_zip is not None and not (self.path.parent / "client.zip").exists():
            tmp = self.path.parent / f".client.zip.{os.getpid()}"
            tmp.write_bytes(Path(client_zip).read_bytes())
            tmp.replace(self.path.parent / "client.zip")
        endpoint = transport.endpoints()[0]
        try:
            saved = json.loads(self.path.read_text())
            keyset, key_id, nbytes = base64.b64decode(saved["secret_keyset"]), saved["key_id"], int(saved["evaluation_key_bytes"])
        except (OSError, ValueError, KeyError, TypeError):
            saved = None
        if saved is not None:
            if maker is not None:
                maker.stop()
            self.origin = "kept from an earlier start"
            try:
                self.client = EncryptedClient.from_keys(transport, circuit_id, folder, keyset, {endpoint: key_id}, nbytes)
                return
            except RuntimeError:  # unreadable keys: make new ones
                pass
        self.origin = "generated at this start"
        # The key maker (a process of its own) starts first; this process loads its client meanwhile.
        made: dict = {}
        maker = maker or KeyMakerProcess()

        def run() -> None:
            try:
                made["keys"] = maker.make(list(transport.endpoints()), circuit_id, Path(folder))
            except Exception as exc:  # noqa: BLE001 - raised below, in the caller's thread
                made["error"] = exc
            finally:
                maker.stop()

        worker = threading.Thread(target=run, name="shared-keys", daemon=True)
        worker.start()
        client = EncryptedClient.download(transport, circuit_id, folder)  # meanwhile
        worker.join()
        if "error" in made:
            raise made["error"]
        made = made["keys"]
        self.client = client.adopt(made["secret_keyset"], {endpoint: next(iter(made["key_ids"].values()))},
                                   made["evaluation_key_bytes"], made["keygen_s"], made["upload_s"])
        self.save()

    def save(self) -> None:
        """Write the secret keys and the key id (atomically, readable by this user only)."""
        key_id = next(iter(self.client.key_ids.values()), None)
        if key_id is None:
            return
        body = json.dumps({"key_id": key_id, "evaluation_key_bytes": self.client.evaluation_key_bytes,
                           "secret_keyset": base64.b64encode(self.client.fhe.secret_keyset()).decode()})
        tmp = self.path.with_name(f".{self.FILE}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(body)
        os.replace(tmp, self.path)

    def predict(self, x):
        """:meth:`EncryptedClient.predict`, one at a time; a new key id (after the service lost
        the keys) is saved."""
        with self.lock:
            before = dict(self.client.key_ids)
            out = self.client.predict(x)
            if self.client.key_ids != before:
                self.save()
            return out
