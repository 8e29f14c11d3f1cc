"""Key generation in a process of its own, for a client that must stay responsive (the dashboard).

Generating a key set holds one core and Python's GIL for about 3 s: inside the Streamlit process
it stalls every visitor's page. ``python -m engine.serve.keymaker`` reads one JSON request per line on
stdin (``{"urls": [...], "circuit": "...", "folder": "..."}``), generates keys for that circuit,
uploads the evaluation keys to the service itself (the ~56 MB never pass through the caller),
and answers one JSON line on stdout with the key id and only the secret keys (about 40 KB,
base64). It runs at a lower CPU priority than the pages it serves. :class:`KeyMakerProcess`
is the caller's side; the dashboard's key pool (``dashboard.keysets``) uses it for HTTP services.
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

from .client import EncryptedClient, ServiceUnavailable

from .transports import HTTPTransport


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
