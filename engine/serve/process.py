"""The service as a child process (``python -m engine serve`` on a free loopback port): the
dashboard's own service when no ``ENGINE_SERVER_URL`` is given, and the tests' and benches'."""

from __future__ import annotations

import time
from pathlib import Path

from .client import ServiceUnavailable


class LocalServiceProcess:
    """``python -m engine serve`` as a child process on a free loopback port (the dashboard's
    service when no ``ENGINE_SERVER_URL`` is given); stopped by :meth:`stop` or at exit."""

    def __init__(self, models_dir: Path | None = None, cache_dir: Path | None = None, key_store_bytes: int | None = None,
                 log: Path | None = None, timeout_s: float = 600.0, key_dir: Path | None = None,
                 key_disk_bytes: int | None = None, first: str = "", wait: bool = True):
        """``wait``: return once the service is ready (else once started: see :meth:`status`);
        ``first``: datasets whose circuits it hosts first (``serve --first``)."""
        import atexit
        import os
        import subprocess
        import sys

        from ..config import REPO_ROOT

        from .ports import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "engine", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        if models_dir:
            cmd += ["--models-dir", str(models_dir)]
        if cache_dir:
            cmd += ["--cache-dir", str(cache_dir)]
        if key_store_bytes:
            cmd += ["--key-store-bytes", str(key_store_bytes)]
        if key_dir:
            cmd += ["--key-dir", str(key_dir)]
        if key_disk_bytes:
            cmd += ["--key-disk-bytes", str(key_disk_bytes)]
        if first:
            cmd += ["--first", first]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        self._log_file = open(log, "ab") if log else None  # the child writes to it; closed by stop()
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=self._log_file or subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        atexit.register(self.stop)
        self.log = log
        if wait:
            self.wait_ready(timeout_s)

    def status(self) -> dict:
        """The service's ``/health`` (``status``: ok, starting with its ``step`` and the circuits
        ``hosted`` so far, or error), or ``{"status": "launching"}`` before it listens; raises
        :class:`ServiceUnavailable` if the process exited."""
        import httpx

        if self.proc.poll() is not None:
            raise ServiceUnavailable(f"the local service exited with code {self.proc.returncode}"
                                     + (f" (log: {self.log})" if self.log else ""))
        try:
            return httpx.get(f"{self.url}/health", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return {"status": "launching"}

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            st = self.status()
            if st.get("status") == "ok":
                return
            if st.get("status") == "error":
                self.stop()
                raise ServiceUnavailable(f"the local service failed to start: {st.get('error')}")
            time.sleep(0.3)
        self.stop()
        raise ServiceUnavailable(f"the local service did not become ready within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except Exception:  # noqa: BLE001
                self.proc.kill()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
