"""Long jobs (training, sweeps) one at a time per process, with the visitor's place in line and progress."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import streamlit as st


class JobQueue:
    """Long jobs (training, sweeps) run one at a time in this process; the others wait in line."""

    def __init__(self):
        self._cond = threading.Condition()
        self._line: list[str] = []

    @contextmanager
    def turn(self, what: str, on_wait=None):
        import uuid

        ticket = f"{what}-{uuid.uuid4().hex[:8]}"
        with self._cond:
            self._line.append(ticket)
            while self._line[0] != ticket:
                if on_wait:
                    on_wait(self._line.index(ticket), len(self._line))
                self._cond.wait(timeout=1.0)
        try:
            yield
        finally:
            with self._cond:
                self._line.remove(ticket)
                self._cond.notify_all()


@st.cache_resource(show_spinner=False)
def job_queue() -> JobQueue:
    return JobQueue()


@contextmanager
def long_job(what: str):
    """Wait for this process's turn for a long job, showing the user their place in line."""
    box = st.empty()

    def waiting(pos: int, total: int) -> None:
        box.info(f"Waiting for {pos} job(s) ahead of this {what} to finish ({total} in line).", icon=":material/hourglass_top:")

    with job_queue().turn(what, waiting):
        box.empty()
        yield


def progress_bar(text: str):
    bar = st.progress(0.0, text=text)

    def update(done: int, total: int, message: str) -> None:
        bar.progress(min(done / max(total, 1), 1.0), text=f"{text}: {message}")

    return bar, update
