"""Concrete's OpenMP thread setting per run, returning freed memory to the system, and keeping
Python's SIGPIPE disposition after Concrete's runtime replaced it."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def _openmp():
    """The OpenMP runtime that Concrete's compiled circuits run their loops on (None if absent)."""
    import ctypes
    import glob

    import concrete

    for root in concrete.__path__:
        for path in sorted(glob.glob(str(Path(root).parent / "concrete_python.libs" / "libomp*.so*"))):
            return ctypes.CDLL(path)  # the library already loaded by Concrete: the same handle
    return None


def set_run_threads(n: int) -> int:
    """Threads that Concrete runs started from the calling thread may use; returns the setting
    in force (0 if Concrete's OpenMP runtime is not found).

    OpenMP keeps this per thread. One run spread over 2 cores takes 0.30 s of wall time and
    0.59 s of CPU; on one core, 0.44 s and 0.44 s (shipped PneumoniaMNIST circuit). Spreading a
    lone run answers sooner; runs side by side, one core each, answer more per second."""
    omp = _openmp()
    if omp is None:
        return 0
    omp.omp_set_num_threads(max(1, int(n)))
    return int(omp.omp_get_max_threads())


def release_memory() -> None:
    """Return freed memory to the system: concrete's key buffers stay mapped until glibc trims."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def ignore_sigpipe() -> None:
    """Put back Python's SIGPIPE disposition (ignore). Concrete's runtime (HPX) installs, when a
    circuit is loaded or first run in a process (simulated or encrypted), a SIGPIPE handler that
    aborts the process: a peer that closed its socket while the process wrote to it (a client
    killed during an upload, a browser tab closed) took the whole service, or the whole
    dashboard, down. libc's ``signal`` works from any thread, unlike Python's ``signal.signal``
    (main thread only). The service also blocks the signal in its threads
    (``engine.serve.api.serve``)."""
    import ctypes
    import signal

    libc = _libc()
    if libc is not None:
        libc.signal(int(signal.SIGPIPE), ctypes.c_void_p(int(signal.SIG_IGN)))


@lru_cache(maxsize=1)
def _libc():
    """The process's C library (loaded once: :func:`ignore_sigpipe` runs after every run)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.signal  # noqa: B018 - present on any POSIX libc
        return libc
    except (OSError, AttributeError):
        return None
