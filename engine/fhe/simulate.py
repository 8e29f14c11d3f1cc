"""FHE simulation of exactly the circuit a cache entry's ``server.zip`` holds."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from .threads import ignore_sigpipe


def thread_tag_stack() -> None:
    """Concrete's ``tag`` keeps a thread-local stack initialised only in the importing thread;
    clear inference from any other thread (Streamlit runs each session in its own) needs one."""
    import importlib

    tag_module = importlib.import_module("concrete.fhe.extensions.tag")  # the package re-exports tag()
    if not hasattr(tag_module.tag_context, "stack"):
        tag_module.tag_context.stack = []


class Simulator:
    """FHE simulation of exactly the circuit in ``server.zip`` (its MLIR, its configuration)."""

    def __init__(self, server_zip: Path):
        import jsonpickle
        from concrete import fhe

        with tempfile.TemporaryDirectory() as d:
            shutil.unpack_archive(server_zip, d, "zip")
            mlir = (Path(d) / "circuit.mlir").read_text(encoding="utf-8")
            options = jsonpickle.loads((Path(d) / "configuration.json").read_text(encoding="utf-8"))
        configuration = fhe.Configuration().fork(**options).fork(fhe_simulation=True)
        self._server = fhe.Server.create(mlir, configuration, is_simulated=True)
        self._client = fhe.Client(self._server.client_specs, is_simulated=True)
        ignore_sigpipe()

    def run(self, q_x: np.ndarray) -> np.ndarray:
        """Quantized input (1, F) -> quantized output (1, C), with simulated PBS noise."""
        out = self._client.simulate_decrypt(self._server.run(self._client.simulate_encrypt(q_x)))
        ignore_sigpipe()  # Concrete's runtime replaces it at the first run: see threads.ignore_sigpipe
        return out
