"""Sweep bit-width and rounding bits for an architecture; accuracy and encrypted latency."""

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

import ui
from engine.config import CompileConfig, ModelConfig, PipelineConfig, TrainConfig
from engine.data import DataError
from engine.sweep import sweep

st.set_page_config(page_title="Bit-width explorer", page_icon="📈", layout="wide")
st.title("📈 Accuracy against bit-width")
st.markdown(
    "Each point trains the architecture with weights, activations and inputs at one bit-width, "
    "compiles it, and measures validation accuracy (float, quantized clear, FHE simulation) and "
    "encrypted latency on a few images. Points are cached on disk: a revisit is instant."
)
if ui.read_only():
    st.info("Read-only demo (ENGINE_READ_ONLY=1): new sweeps are disabled.", icon=":material/lock:")
    st.stop()
present = ui.present_datasets(ui.data_dir())
if not present:
    st.warning(f"No MedMNIST file found in {ui.data_dir()}: set MEDMNIST_DIR.")
    st.stop()
with st.form("sweep_form"):
    c1, c2 = st.columns(2)
    dataset = c1.selectbox("Dataset", present, key="sw_dataset")
    hidden_text = c1.text_input("Hidden widths", "16", key="sw_hidden")
    epochs = c1.number_input("Epochs per point", 1, 50, 5, key="sw_epochs")
    limit = c1.number_input("Training images (0 = all)", 0, 1_000_000, 0, key="sw_limit")
    bits = c2.slider("Bit-widths", 2, 8, (2, 8), key="sw_bits")
    rounding = c2.multiselect("Rounding threshold bits", [3, 4, 5, 6, 7, 8], default=[5], key="sw_rounding")
    n_val = c2.number_input("Validation images (0 = all)", 0, 100_000, 0, key="sw_nval")
    n_fhe = c2.number_input("Images for encrypted latency (0 = skip)", 0, 20, 2, key="sw_nfhe")
    go_btn = st.form_submit_button("Run sweep", type="primary")

if go_btn:
    try:
        hidden = ModelConfig.parse_hidden(hidden_text)
        base = PipelineConfig(data=ui.data_config(dataset), model=ModelConfig(hidden=hidden),
                              train=TrainConfig(epochs=int(epochs), limit_train=int(limit)), compile=CompileConfig())
        with ui.long_job("sweep"):
            bar, update = ui.progress_bar("Sweeping")
            rows = sweep(base, list(range(bits[0], bits[1] + 1)), sorted(rounding) or [5], int(n_val), int(n_fhe), progress=update)
            st.session_state["sweep_rows"] = rows
    except (DataError, ValueError) as exc:
        ui.fail(exc)

rows = st.session_state.get("sweep_rows")
if rows:
    df = pd.DataFrame(rows)
    fig = go.Figure()
    for r, part in df.groupby("rounding_bits"):
        for col, label in [("float_accuracy", "float"), ("quantized_accuracy", "quantized"), ("simulate_accuracy", "simulated")]:
            fig.add_scatter(x=part["bits"], y=part[col], mode="lines+markers", name=f"{label} (rounding {r})")
    fig.update_layout(xaxis_title="bit-width", yaxis_title="validation accuracy", height=380, margin=dict(t=20))
    st.plotly_chart(fig, key="sweep_acc")
    if df["fhe_latency_median_s"].notna().any():
        fig2 = go.Figure()
        for r, part in df.groupby("rounding_bits"):
            fig2.add_scatter(x=part["bits"], y=1000 * part["fhe_latency_median_s"], mode="lines+markers", name=f"rounding {r}")
        fig2.add_hline(y=1000 * ui.REFERENCE["latency_s"], line_dash="dot", annotation_text="reference 150 ms")
        fig2.update_layout(xaxis_title="bit-width", yaxis_title="encrypted latency per image (ms)", height=340, margin=dict(t=20))
        st.plotly_chart(fig2, key="sweep_lat")
    st.dataframe(df, hide_index=True)
