"""Streamlit glue shared by the pages: cached engine objects, per-session keys, pickers.

Everything here is presentation or caching; the work itself is done by ``engine``.
Compiled circuits and servers are shared across browser sessions (``st.cache_resource``);
each browser session gets its own ``FHEClient`` (its keys live in that session's state only).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import streamlit as st

from engine import registry
from engine.config import CompileConfig, DataConfig, default_data_dir
# available_datasets, present_datasets and MODES are re-exported for the pages.
from engine.data import DataError, available_datasets, dataset_info, present_datasets  # noqa: F401
from engine.fhe import FHEClient, FHEServer, compile_model
from engine.infer import MODES, Predictor  # noqa: F401
from engine.metrics import label_text

REFERENCE = {"plaintext_accuracy": 0.882, "encrypted_accuracy": 0.875, "latency_s": 0.150}
MODE_LABELS = {"float": "Float (PyTorch)", "quantized": "Quantized clear", "simulate": "FHE simulation", "fhe": "Encrypted (FHE)"}


def data_dir() -> Path:
    return default_data_dir()


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


def model_page(page_title: str, icon: str, title: str):
    """Page header + sidebar pickers: (saved model, compile config, dataset info); stops the
    page when no model exists yet."""
    st.set_page_config(page_title=page_title, page_icon=icon, layout="wide")
    st.title(f"{icon} {title}")
    saved = select_model()
    if saved is None:
        st.stop()
    return saved, compile_settings(saved), dataset_info(saved.dataset)


def compile_settings(saved: registry.SavedModel, container=None) -> CompileConfig:
    """Rounding bits and p_error widgets, defaulting to the settings saved with the model."""
    box = container or st.sidebar
    base = saved.config.compile
    rb = box.slider("Rounding threshold bits", 2, 8, base.rounding_threshold_bits, key="cc_rounding",
                    help="Accumulators are rounded to this many bits before each table lookup.")
    options = sorted({0.001, 0.01, 0.05, 0.1, 0.2, base.p_error})
    pe = box.select_slider("p_error per lookup", options, value=base.p_error, key="cc_perror")
    return CompileConfig(rounding_threshold_bits=rb, rounding_method=base.rounding_method, p_error=pe,
                         inputset_size=base.inputset_size)


@st.cache_resource(show_spinner=False, max_entries=16)
def _shared_circuit(dataset: str, name: str, model_hash: str, cc_json: str):
    """Compiled circuit + server for a model and compile config, shared by all sessions."""
    saved = registry.load(dataset, name)
    cc = CompileConfig(**json.loads(cc_json))
    compiled = compile_model(saved, cc)
    return compiled, FHEServer(compiled.deployment_dir)


def predictor(saved: registry.SavedModel, cc: CompileConfig) -> Predictor:
    """A Predictor on the shared circuit and server, with this session's own client keys."""
    cc_json = json.dumps(cc.__dict__, sort_keys=True)
    compiled, server = _shared_circuit(saved.dataset, saved.name, saved.hash, cc_json)
    clients: dict = st.session_state.setdefault("fhe_clients", {})
    key = compiled.report.cache_key
    if key not in clients:
        clients[key] = FHEClient(compiled)  # keys in memory, this session only
    return Predictor(saved=saved, compile_config=cc, compiled=compiled, client=clients[key], server=server)


def session_client(saved: registry.SavedModel, cc: CompileConfig) -> FHEClient | None:
    """This session's client for the model's circuit, if it has one (never compiles)."""
    from engine.fhe import cache_key

    return st.session_state.get("fhe_clients", {}).get(cache_key(saved.hash, cc))


def progress_bar(text: str):
    bar = st.progress(0.0, text=text)

    def update(done: int, total: int, message: str) -> None:
        bar.progress(min(done / max(total, 1), 1.0), text=f"{text}: {message}")

    return bar, update


def results_table(results: dict, info, labels_true=None) -> pd.DataFrame:
    """One row per image and mode: prediction, probabilities, latency and FHE stage timings."""
    rows = []
    for mode, r in results.items():
        for i in range(len(r.latency_s)):
            row = {"image": i, "mode": MODE_LABELS[mode], "prediction": label_text(info, r.predictions[i])}
            if labels_true is not None:
                row["true"] = labels_true[i]
            if not info.multi_label:
                for c, lbl in info.labels.items():
                    row[f"P({lbl})"] = round(float(r.scores[i, c]), 4)
            row["latency (ms)"] = round(1000 * float(r.latency_s[i]), 2)
            for stage in ("encrypt_s", "server_s", "decrypt_s"):
                if stage in r.stages:
                    row[f"{stage[:-2]} (ms)"] = round(1000 * float(r.stages[stage][i]), 2)
            rows.append(row)
    return pd.DataFrame(rows)


def agreement_text(results: dict) -> str:
    from engine.evaluate import agreement

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

