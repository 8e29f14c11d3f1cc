"""Engine objects the pages share across sessions: compiled circuits, predictors over the service,
the input check and calibration, stability measurements (Streamlit caches, keyed by one spelling
of a compile config)."""

from __future__ import annotations

import dataclasses
import gc
import json

import streamlit as st

from engine.config import CompileConfig
from engine.fhe.circuit import compile_model
from engine.fhe.threads import release_memory
from engine.learn import registry
from engine.study.infer import Predictor

from .keysets import SharedKeys
from .page import data_config
from .service import served_circuit, shared_future
from .sessions import prepare_keys, session_remote


def settings_key(cc: CompileConfig) -> str:
    """A compile config as the caches key it (one spelling for every cache)."""
    return json.dumps(dataclasses.asdict(cc), sort_keys=True)


def compile_settings(saved: registry.SavedModel, container=None) -> CompileConfig:
    """Rounding bits and p_error widgets, defaulting to the settings saved with the model."""
    box = container or st.sidebar
    base = saved.config.compile
    rb = box.slider("Rounding threshold bits", 2, 8, base.rounding_threshold_bits, key="cc_rounding",
                    help="Accumulators are rounded to this many bits before each table lookup.")
    options = sorted({1e-5, 1e-4, 0.001, 0.01, 0.05, 0.1, 0.2, base.p_error})
    pe = box.select_slider("p_error per lookup", options, value=base.p_error, key="cc_perror")
    return CompileConfig(rounding_threshold_bits=rb, rounding_method=base.rounding_method, p_error=pe,
                         inputset_size=base.inputset_size)


@st.cache_resource(show_spinner=False, max_entries=16)
def _shared_circuit(dataset: str, name: str, model_hash: str, cc_json: str):
    """Compiled circuit for a model and compile config (the clear modes), shared by all sessions."""
    saved = registry.load(dataset, name)
    cc = CompileConfig(**json.loads(cc_json))
    compiled = compile_model(saved, cc)
    gc.freeze()  # concrete's modules, loaded by the first circuit, and the circuit: kept for good
    return compiled


def compiled_circuit(saved: registry.SavedModel, cc: CompileConfig):
    return _shared_circuit(saved.dataset, saved.name, saved.hash, settings_key(cc))


def predictor(saved: registry.SavedModel, cc: CompileConfig | None = None) -> Predictor:
    """A Predictor on the shared circuit whose encrypted mode goes over HTTP to the service,
    with this session's own keys."""
    cc = cc or saved.config.compile
    remote = session_remote(saved)
    return Predictor(saved=saved, compile_config=cc, compiled=compiled_circuit(saved, cc), client=remote.fhe,
                     transport=remote.transport, remote=remote, keep_evaluation_keys=False)


def encrypted_predictor(saved: registry.SavedModel) -> tuple[Predictor, str]:
    """A Predictor for the encrypted mode alone (no compiled circuit in this process), and which
    key set answers: this session's own when they are ready, else the app's shared key set
    (whichever is ready first; waits for one of them)."""
    from concurrent.futures import FIRST_COMPLETED, wait as wait_for

    prepare_keys(saved)
    own = st.session_state["session_keys"][saved.hash].future
    shared = shared_future(saved)
    served_circuit(saved)  # hosted (the service may still be starting)
    if not own.done() and not shared.done():
        wait_for([own, shared], timeout=600, return_when=FIRST_COMPLETED)
    if own.done() and own.exception() is None:
        remote, which = own.result(), "this session's own keys"
    else:
        keys = shared.result()
        remote, which = _Serialized(keys), "the app's shared key set (this session's own keys are still being made)"
    return Predictor(saved=saved, compile_config=saved.config.compile, client=remote.fhe, transport=remote.transport,
                     remote=remote, keep_evaluation_keys=False), which


class _Serialized:
    """A SharedKeys' client as a Predictor's ``remote``: its runs one at a time."""

    def __init__(self, keys: SharedKeys):
        self._keys = keys
        self.fhe, self.transport = keys.client.fhe, keys.client.transport
        self.evaluation_key_bytes = keys.client.evaluation_key_bytes

    def register(self, endpoint=None) -> str:
        return self._keys.client.register(endpoint)

    def predict(self, x):
        return self._keys.predict(x)


def decrypt_with_fresh_key(saved: registry.SavedModel, result: bytes):
    """Decrypt an encrypted result with a newly generated, unrelated key: the logits it yields."""
    import numpy as np

    from engine.fhe.keys import FHEClient

    stranger = FHEClient(compiled_circuit(saved, saved.config.compile))
    stranger.keygen()
    try:
        return np.asarray(stranger.decrypt(result), dtype=float).reshape(-1)
    finally:
        del stranger
        release_memory()


@st.cache_resource(show_spinner="Preparing the input check…")
def _guard(dataset: str, name: str, model_hash: str):
    from engine.learn import guard as guards

    return guards.for_model(registry.load(dataset, name), data_config(dataset))


def guard(saved: registry.SavedModel):
    """The model's input check and confidence calibration (None when it cannot be had here)."""
    return _guard(saved.dataset, saved.name, saved.hash)


@st.cache_data(show_spinner="Measuring stability: repeated simulations of validation images…", max_entries=64)
def _stability(dataset: str, name: str, model_hash: str, cc_json: str):
    from engine.study import stability as stab

    saved, cc = registry.load(dataset, name), CompileConfig(**json.loads(cc_json))
    return stab.check(saved, cc, data_config(dataset), compiled=compiled_circuit(saved, cc))


def stability(saved: registry.SavedModel, cc: CompileConfig):
    """Agreement of repeated simulations on validation (cached per model and settings)."""
    return _stability(saved.dataset, saved.name, saved.hash, settings_key(cc))


def nearest_stable(saved: registry.SavedModel, cc: CompileConfig):
    from engine.study import stability as stab

    return stab.propose(saved, cc, data_config(saved.dataset))
