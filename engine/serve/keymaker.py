"""Key generation in a process of its own, for a client that must stay responsive (the dashboard).

Generating a key set holds one core and Python's GIL for about 3 s: inside the Streamlit process
it stalls every visitor's page. ``python -m engine.keymaker`` reads one JSON request per line on
stdin (``{"urls": [...], "circuit": "...", "folder": "..."}``), generates keys for that circuit,
uploads the evaluation keys to the service itself (the ~56 MB never pass through the caller),
and answers one JSON line on stdout with the key id and only the secret keys (about 40 KB,
base64). It runs at a lower CPU priority than the pages it serves. :class:`KeyMakerProcess`
is the caller's side; :class:`engine.client.KeyPool` uses it for HTTP services.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from pathlib import Path


def make(urls: list[str], circuit_id: str, folder: str) -> dict:
    """Generate, upload, keep the secret keys only: what the caller needs to rebuild the client."""
    from .client import EncryptedClient, HTTPTransport

    transport = HTTPTransport(urls)
    try:
        client = EncryptedClient.download(transport, circuit_id, Path(folder))
        client.register()
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
    """One ``python -m engine.keymaker`` child; restarted if it dies. Calls are serialized."""

    def __init__(self):
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        import atexit

        from .config import REPO_ROOT

        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen([sys.executable, "-m", "engine.keymaker"], cwd=REPO_ROOT, env=env, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        atexit.register(self.stop)
        return proc

    def make(self, urls: list[str], circuit_id: str, folder: Path) -> dict:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            self._proc.stdin.write(json.dumps({"urls": urls, "circuit": circuit_id, "folder": str(folder)}) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the key maker process exited (code {self._proc.poll()})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        answer["secret_keyset"] = base64.b64decode(answer["secret_keyset"])
        return answer

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
