"""Streamlit glue shared by the pages: cached engine objects, per-session keys, pickers.

Everything here is presentation or caching; the work itself is done by ``engine``.
Compiled circuits are shared across browser sessions (``st.cache_resource``). Encrypted runs go
over HTTP to the service (``ENGINE_SERVER_URL``, else one this process starts on a loopback
port). Each browser session gets its own client keys, taken from a pool generated ahead of
demand; after the upload the session holds only its secret keys, and tells the service to drop
its evaluation keys when the session ends.
"""

from __future__ import annotations

import gc
import json
import os
import threading
import weakref
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import streamlit as st

from engine.learn import registry
from engine.config import CompileConfig, DataConfig, default_data_dir
# available_datasets, present_datasets and MODES are re-exported for the pages.
from engine.learn.data import DataError, available_datasets, dataset_info, present_datasets  # noqa: F401
from engine.serve.client import EncryptedClient
from engine.serve.keymaker import KeyPool, SharedKeys
from engine.config import default_cache_dir
from engine.fhe.circuit import compile_model
from engine.fhe.threads import release_memory
from engine.study.infer import MODES, Predictor  # noqa: F401
from engine.study.stability import STABLE  # noqa: F401 - the Compile page says what "stable" means
from engine.learn.metrics import label_text

# What the imports above loaded (pandas, streamlit; torch and concrete-ml come with the first page
# that trains or compiles, see _shared_circuit) lives as long as the process: move it out of the collector's sight, so a
# full collection (ours when a session ends, Python's own) takes about 0.1 ms, not 0.12 s with
# the GIL held.
gc.freeze()

# The browser tab's icon, served by Streamlit itself: a Material icon as page_icon makes every
# visitor's browser fetch it from fonts.gstatic.com (a third party learns of each visit; offline
# it fails). The icons in the navigation are drawn from a font Streamlit serves.
FAVICON = str(Path(__file__).resolve().parent / "assets" / "favicon.png")

REFERENCE = {"plaintext_accuracy": 0.882, "encrypted_accuracy": 0.875, "latency_s": 0.150}
MODE_LABELS = {"float": "Float (PyTorch)", "quantized": "Quantized clear", "simulate": "FHE simulation", "fhe": "Encrypted (FHE)"}


def data_dir() -> Path:
    return default_data_dir()


def store_upload(name: str, data: bytes) -> str:
    """An uploaded archive kept in the cache folder under its content hash (training reads it by
    path, and the prepared images are cached by content); its path."""
    import hashlib

    folder = default_cache_dir() / "uploads" / hashlib.sha256(data).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / Path(name).name
    if not path.exists():
        path.write_bytes(data)
    return str(path)


def data_config(dataset: str, allow_download: bool = False) -> DataConfig:
    return DataConfig(dataset=dataset, data_dir=str(data_dir()), allow_download=allow_download)


def datasets_with_models() -> list[str]:
    return sorted({m.dataset for m in registry.list_models()})


def select_model(container=None) -> registry.SavedModel | None:
    """Dataset + model pickers (sidebar by default); remembers the choice for the session."""
    box = container or st.sidebar
    datasets = datasets_with_models()
    if not datasets:
        box.warning("No trained model yet: train one on the Train page.")
        return None
    current = st.session_state.get("model", ("pneumoniamnist", None))
    ds_index = datasets.index(current[0]) if current[0] in datasets else 0
    # No widget keys: the default follows st.session_state["model"], which other pages may set.
    dataset = box.selectbox("Dataset", datasets, index=ds_index)
    models = registry.list_models(dataset)
    names = [m.name for m in models]
    name_index = names.index(current[1]) if current[1] in names else 0
    name = box.selectbox("Model", names, index=name_index, help="Newest first")
    st.session_state["model"] = (dataset, name)
    return models[names.index(name)]


def model_page(page_title: str, title: str):
    """Page header + sidebar pickers: (saved model, compile config, dataset info); stops the
    page when no model exists yet. Encrypted runs use the circuit the service serves: the
    model's own compile settings. Key generation for this session starts in the background."""
    st.set_page_config(page_title=page_title, page_icon=FAVICON, layout="wide")
    st.title(title)
    saved = select_model()
    if saved is None:
        st.stop()
    cc = saved.config.compile
    st.sidebar.caption(f"Served circuit: rounding {cc.rounding_threshold_bits} bits ({cc.rounding_method}), "
                       f"p_error {cc.p_error:g}. Service: {service_url()}")
    prepare_keys(saved)
    return saved, cc, dataset_info(saved.dataset)


def read_only() -> bool:
    """``ENGINE_READ_ONLY=1``: a public demo offers inference only (no training, sweeps or writes)."""
    return os.environ.get("ENGINE_READ_ONLY", "").strip().lower() in ("1", "true", "yes")


# --------------------------------------------------------------------------- the service


# The service itself (started by app.py before anything heavy is imported): ui_service.
from ui_service import (DEFAULT_DATASET, _keygen_executor, _shared_future, _transport, served_circuit,  # noqa: E402,F401
                        service_origin, service_status, service_url, shared_keys)


@st.cache_resource(show_spinner=False)
def _key_pool(url: str, circuit_id: str) -> KeyPool:
    import atexit

    spares = int(os.environ.get("ENGINE_KEY_SPARES", "8"))
    pool = KeyPool(lambda: _transport(url), circuit_id, default_cache_dir() / "client", spares=spares,
                   log=default_cache_dir() / "keymaker.log")
    atexit.register(pool.close)  # before the local service stops (registered earlier, runs later)
    return pool


def start_steps(saved: registry.SavedModel) -> list[tuple[bool, str]]:
    """The start-up as this session sees it: (done, what) for the service, this model's circuit,
    the app's shared key set and this session's own keys."""
    status = service_status()
    state = status.get("status")
    hosted = [c for c in status.get("hosted", []) if c["dataset"] == saved.dataset]
    if state == "ok":
        service = (True, f"Service ready ({status.get('circuits')} circuits)")
    elif state == "launching":
        service = (False, "Service process starting")
    elif state == "error":
        service = (False, f"Service failed: {status.get('error')}")
    else:
        service = (False, f"Service starting: {status.get('step', '')} ({status.get('circuits', 0)} circuits hosted)")
    circuit = (state == "ok" or bool(hosted), f"Circuit of {saved.dataset}/{saved.name} hosted")
    shared = _shared_future(saved)
    if shared.done():
        exc = shared.exception()
        app = (exc is None, "App's shared key set " + (f"ready ({shared.result().origin})" if exc is None else f"failed: {exc}"))
    else:
        app = (False, "App's shared key set being made (key generation, then the upload once the circuit is hosted)")
    own = st.session_state.get("session_keys", {}).get(saved.hash)
    mine = (own is not None and own.future.done() and own.future.exception() is None,
            "This session's own keys " + ("ready" if own is not None and own.future.done() else "being made"))
    return [service, circuit, app, mine]


class SessionKeys:
    """This browser session's client of one circuit; drops its keys on the service when the
    session ends (Streamlit clears the session state, this object is collected)."""

    def __init__(self, future):
        self.future = future
        weakref.finalize(self, SessionKeys._release, future)

    @staticmethod
    def _release(future) -> None:
        if future.done() and future.exception() is None:
            future.result().close()
        release_memory()


def prepare_keys(saved: registry.SavedModel) -> None:
    """Start getting this session's keys (from the pool, else generated) without waiting."""
    keys: dict = st.session_state.setdefault("session_keys", {})
    if saved.hash in keys:
        return
    url = service_url()
    shared = _shared_future(saved)  # started first: the first answers need not wait for this session's keys

    def get() -> EncryptedClient:
        from concurrent.futures import wait as wait_for

        wait_for([shared], timeout=600)  # the shared key set first: the two would share the cores
        return _key_pool(url, served_circuit(saved)["id"]).take()

    keys[saved.hash] = SessionKeys(_keygen_executor().submit(get))


def session_remote(saved: registry.SavedModel, wait: bool = True, patience_s: float = 0.5) -> EncryptedClient | None:
    """This session's client (keys uploaded, secret keys only); None if not ready and not ``wait``
    (after ``patience_s``: a spare key set is handed out in milliseconds, so a fresh session's
    first page already has its keys)."""
    prepare_keys(saved)
    fut = st.session_state["session_keys"][saved.hash].future
    if not wait:
        from concurrent.futures import wait as wait_for

        if not wait_for([fut], timeout=patience_s).done:
            return None
    return fut.result(timeout=600)


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
    return _shared_circuit(saved.dataset, saved.name, saved.hash, json.dumps(cc.__dict__, sort_keys=True))


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
    shared = _shared_future(saved)
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


class JobQueue:
    """Long jobs (training, sweeps) run one at a time in this process; the others wait in line."""

    def __init__(self):
        self._cond = threading.Condition()
        self._line: list[str] = []

    def position(self, ticket: str) -> int:
        with self._cond:
            return self._line.index(ticket) if ticket in self._line else -1

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
    return _stability(saved.dataset, saved.name, saved.hash, json.dumps(cc.__dict__))


def nearest_stable(saved: registry.SavedModel, cc: CompileConfig):
    from engine.study import stability as stab

    return stab.propose(saved, cc, data_config(saved.dataset))


def batch_table(items, fhe, info, guard) -> pd.DataFrame:
    from engine.learn.guard import batch_rows

    return pd.DataFrame(batch_rows(items, fhe.logits, fhe.predictions, lambda p: label_text(info, p), guard))


def confidence_text(saved: registry.SavedModel, logits) -> str:
    """The calibrated confidence of one answer, as shown next to it ('' without a guard)."""
    g = guard(saved)
    if g is None:
        return ""
    return g.confidence(logits).text()


def results_table(results: dict, info, labels_true=None, guard=None) -> pd.DataFrame:
    """One row per image and mode: prediction, probabilities (calibrated with the model's guard
    where given), latency and FHE stage timings."""
    rows = []
    for mode, r in results.items():
        for i in range(len(r.latency_s)):
            row = {"image": i, "mode": MODE_LABELS[mode], "prediction": label_text(info, r.predictions[i])}
            if labels_true is not None:
                row["true"] = labels_true[i]
            if not info.multi_label:
                probs = guard.confidence(r.logits[i]).probabilities if guard is not None else r.scores[i]
                for c, lbl in info.labels.items():
                    row[f"P({lbl})" + (" calibrated" if guard is not None else "")] = round(float(probs[c]), 4)
            row["latency (ms)"] = round(1000 * float(r.latency_s[i]), 2)
            for stage in ("encrypt_s", "network_s", "queue_s", "server_s", "decrypt_s"):
                if stage in r.stages:
                    row[f"{stage[:-2]} (ms)"] = round(1000 * float(r.stages[stage][i]), 2)
            rows.append(row)
    return pd.DataFrame(rows)


def agreement_text(results: dict) -> str:
    from engine.study.evaluate import agreement

    modes = list(results)
    parts = [f"{MODE_LABELS[a]} vs {MODE_LABELS[b]}: {100 * agreement(results[a], results[b]):.0f}%"
             for i, a in enumerate(modes) for b in modes[i + 1:]]
    return " · ".join(parts)


def sizes_text(results: dict) -> str | None:
    fhe = results.get("fhe")
    if not fhe or not fhe.sizes:
        return None
    s = fhe.sizes
    return (f"Ciphertext sent: {s['ciphertext_bytes'] / 1024:.1f} KiB per image · encrypted result: "
            f"{s['result_bytes'] / 1024:.1f} KiB · evaluation keys (sent once): {s['eval_key_bytes'] / 2**20:.1f} MiB")


def fail(exc: Exception) -> None:
    """Show an error as a message, never a traceback."""
    st.error(f"{type(exc).__name__}: {exc}" if not isinstance(exc, (DataError, ValueError)) else str(exc))



def confusion_figure(report: dict):
    """The answer mode's confusion matrix as a heatmap (rows: true label)."""
    import plotly.graph_objects as go

    names = list(report["labels"].values())
    m = report["modes"][report["answer_mode"]]["confusion"]
    fig = go.Figure(go.Heatmap(z=m, x=names, y=names, colorscale="Blues", text=m, texttemplate="%{text}",
                               showscale=False))
    fig.update_layout(xaxis_title="predicted", yaxis_title="true", yaxis_autorange="reversed", height=320,
                      margin=dict(l=10, r=10, t=30, b=10), title="Confusion matrix")
    return fig


def reliability_figure(report: dict):
    """Accuracy per calibrated-confidence bin against the diagonal a calibrated model follows."""
    import plotly.graph_objects as go

    bins = [b for b in report["reliability"] if b["n"]]
    fig = go.Figure([
        go.Bar(x=[(b["from"] + b["to"]) / 2 for b in bins], y=[b["accuracy"] for b in bins], width=0.09,
               text=[f"n={b['n']}" for b in bins], textposition="outside", name="accuracy"),
        go.Scatter(x=[0.5, 1.0], y=[0.5, 1.0], mode="lines", line=dict(dash="dash"), name="calibrated"),
    ])
    fig.update_layout(xaxis_title="calibrated confidence", yaxis_title="share right", yaxis_range=[0, 1.1],
                      xaxis_range=[0.45, 1.05], height=320, margin=dict(l=10, r=10, t=30, b=10),
                      title="Reliability", showlegend=False)
    return fig
