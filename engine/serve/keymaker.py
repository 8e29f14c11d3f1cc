"""Key generation in a process of its own, for a client that must stay responsive (the dashboard).

Generating a key set holds one core and Python's GIL for about 3 s: inside the Streamlit process
it stalls every visitor's page. ``python -m engine.serve.keymaker`` reads one JSON request per line on
stdin (``{"urls": [...], "circuit": "...", "folder": "..."}``), generates keys for that circuit,
uploads the evaluation keys to the service itself (the ~56 MB never pass through the caller),
and answers one JSON line on stdout with the key id and only the secret keys (about 40 KB,
base64). It runs at a lower CPU priority than the pages it serves. :class:`KeyMakerProcess`
is the caller's side; :class:`KeyPool` (below) uses it for HTTP services.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from .client import EncryptedClient, HTTPTransport, ServiceUnavailable


def wait_for_circuit(transport, circuit_id: str, timeout_s: float = 600.0) -> None:
    """Until the service (maybe still starting, maybe not yet listening) hosts ``circuit_id``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if any(c["id"] == circuit_id for c in transport.circuits()):
                return
        except ServiceUnavailable:
            pass
        if time.monotonic() > deadline:
            raise ServiceUnavailable(f"the service did not host circuit {circuit_id[:12]} within {timeout_s:.0f} s")
        time.sleep(0.3)


def _say(message: str) -> None:
    """One line of progress on stderr (the caller's key maker log, if it keeps one)."""
    sys.stderr.write(f"[keymaker {os.getpid()}] {message}\n")
    sys.stderr.flush()


def make(urls: list[str], circuit_id: str, folder: str) -> dict:
    """Generate, upload, keep the secret keys only: what the caller needs to rebuild the client.
    With the circuit's ``client.zip`` already in ``folder`` (a shipped circuit), the keys are
    generated while the service may still be starting; the upload waits for the circuit."""
    transport = HTTPTransport(urls)
    try:
        client = EncryptedClient.download(transport, circuit_id, Path(folder))
        client.fhe.keygen()
        _say(f"keys generated for {circuit_id[:12]} ({client.fhe.keygen_s:.1f} s)")
        t0 = time.perf_counter()
        wait_for_circuit(transport, circuit_id)
        _say(f"the service hosts {circuit_id[:12]} (waited {time.perf_counter() - t0:.1f} s)")
        client.register()
        _say(f"evaluation keys uploaded and warmed ({client.upload_s:.1f} s)")
        return {"key_ids": client.key_ids, "secret_keyset": base64.b64encode(client.fhe.secret_keyset()).decode(),
                "keygen_s": client.fhe.keygen_s, "upload_s": client.upload_s,
                "evaluation_key_bytes": client.evaluation_key_bytes}
    finally:
        transport.close()


def main() -> int:
    try:
        os.nice(10)  # visitors' pages and predictions first
    except OSError:
        pass
    # Before the first request: a key maker started early (the dashboard's, at its start) is then
    # ready to generate at once. The client needs Concrete's compiler runtime only (about 0.2 s).
    t0 = time.perf_counter()
    import concrete.compiler  # noqa: F401

    _say(f"libraries loaded ({time.perf_counter() - t0:.1f} s)")
    for line in sys.stdin:
        try:
            req = json.loads(line)
            answer = make(req["urls"], req["circuit"], req["folder"])
        except Exception as exc:  # noqa: BLE001 - reported to the caller, the loop goes on
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    return 0


class KeyMakerProcess:
    """One ``python -m engine.serve.keymaker`` child; restarted if it dies. Calls are serialized."""

    def __init__(self, start: bool = False, log: Path | None = None):
        """``start``: launch the process now (it loads its libraries before the first request).
        ``log``: a file its progress lines are appended to (timings only: never a key)."""
        self._lock = threading.Lock()
        self._closed = False
        self.log = Path(log) if log else None
        self._proc: subprocess.Popen | None = self._start() if start else None

    def _start(self) -> subprocess.Popen:
        import atexit

        from ..config import REPO_ROOT

        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        err = subprocess.DEVNULL
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            err = open(self.log, "ab")  # noqa: SIM115 - the child holds it; closed here once passed
        try:
            proc = subprocess.Popen([sys.executable, "-m", "engine.serve.keymaker"], cwd=REPO_ROOT, env=env, text=True,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        finally:
            if err is not subprocess.DEVNULL:
                err.close()
        atexit.register(self.stop)
        return proc

    def make(self, urls: list[str], circuit_id: str, folder: Path) -> dict:
        with self._lock:
            if self._closed:
                raise RuntimeError("the key maker was stopped")
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            proc = self._proc  # stop() may clear the attribute meanwhile
            try:
                proc.stdin.write(json.dumps({"urls": urls, "circuit": circuit_id, "folder": str(folder)}) + "\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
            except (OSError, ValueError):  # stopped while writing: a closed pipe
                line = ""
        if not line:
            raise RuntimeError(f"the key maker process exited (code {proc.poll()})"
                               + (": it was stopped" if self._closed else ""))
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        answer["secret_keyset"] = base64.b64decode(answer["secret_keyset"])
        return answer

    def stop(self, wait_s: float = 10.0) -> None:
        """Stop the process (for good: no later :meth:`make` restarts it). It finishes the
        request in hand within ``wait_s`` seconds, else it is killed (0: at once)."""
        self._closed = True
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())


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
