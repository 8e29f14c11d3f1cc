"""What every page shares: the header and the model pickers, the data folder, the read-only switch,
errors shown as messages.

Everything here is presentation; the work itself is done by ``engine``."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import streamlit as st

from engine.config import DataConfig, default_cache_dir, default_data_dir
from engine.learn import registry
from engine.learn.data import DataError, dataset_info

from . import points
from .service import service_url
from .sessions import prepare_keys

# The browser tab's icon, served by Streamlit itself: a Material icon as page_icon makes every
# visitor's browser fetch it from fonts.gstatic.com (a third party learns of each visit; offline
# it fails). The icons in the navigation are drawn from a font Streamlit serves.
FAVICON = str(Path(__file__).resolve().parent.parent / "assets" / "favicon.png")

REFERENCE = {"plaintext_accuracy": 0.882, "encrypted_accuracy": 0.875, "latency_s": 0.150}


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
    st.sidebar.caption(f"Answers decided by {points.in_force(saved)}.")
    prepare_keys(saved)
    return saved, cc, dataset_info(saved.dataset)


def read_only() -> bool:
    """``ENGINE_READ_ONLY=1``: a public demo offers inference only (no training, sweeps or writes)."""
    return os.environ.get("ENGINE_READ_ONLY", "").strip().lower() in ("1", "true", "yes")


def fail(exc: Exception) -> None:
    """Show an error as a message, never a traceback."""
    st.error(f"{type(exc).__name__}: {exc}" if not isinstance(exc, (DataError, ValueError)) else str(exc))


# What the imports above loaded (pandas, streamlit; torch and concrete-ml come with the first page
# that trains or compiles, see circuits._shared_circuit) lives as long as the process: move it out
# of the collector's sight, so a full collection (ours when a session ends, Python's own) takes
# about 0.1 ms, not 0.12 s with the GIL held.
gc.freeze()
