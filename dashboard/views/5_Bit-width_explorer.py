"""Accuracy against bit-width: the shipped sweeps at once, the search's Pareto front, new sweeps."""

import dataclasses

import streamlit as st

from dashboard import jobs, page
from engine.learn.data import present_datasets
from engine.study import explore
from engine.config import CompileConfig, ModelConfig, PipelineConfig, TrainConfig
from engine.learn.data import DataError

st.set_page_config(page_title="Bit-width explorer", page_icon=page.FAVICON, layout="wide")
st.title("Accuracy against bit-width")
st.markdown(
    "Each point trains the model's recipe with weights, activations and inputs at one bit-width, "
    "compiles it at one rounding setting, and measures it on the **validation** split: accuracy in "
    "float, quantized clear and FHE simulation, accuracy through real encryption on a sample, AUC, "
    "encrypted latency, key generation, evaluation-key size and circuit size."
)

saved = page.select_model()
shipped = explore.shipped_datasets()
current = saved.dataset if saved is not None else (shipped[0] if shipped else None)
options = sorted(set(shipped) | ({current} if current else set()))
if not options:
    st.warning("No sweep results are shipped in bench/results/ and no model is trained yet.")
    st.stop()
dataset = st.selectbox("Dataset", options, index=options.index(current) if current in options else 0, key="ex_dataset")

tab_curves, tab_pareto, tab_new = st.tabs(["Curves", "Pareto front of the search", "Run a new sweep"])

with tab_curves:
    sweep_doc = explore.load_sweep(dataset)
    rows = list(sweep_doc["points"]) if sweep_doc else []
    rows += st.session_state.get("ex_new_rows", {}).get(dataset, [])
    if not rows:
        st.info(f"No sweep for {dataset} yet: run one in the last tab, or `python -m engine sweep --dataset {dataset}`.")
    else:
        if sweep_doc:
            st.caption(f"Shipped sweep of `{sweep_doc['model']}`'s recipe ({len(sweep_doc['points'])} points), made by "
                       f"`{sweep_doc['command']}`.")
        c1, c2 = st.columns([1, 2])
        metric = c1.selectbox("Metric", list(explore.METRICS), format_func=lambda k: explore.METRICS[k].label, key="ex_metric")
        series = explore.series_names(rows)
        # Keyed by the series present: new sweep points appear selected.
        chosen = c2.multiselect("Curves", series, default=series, key=f"ex_series_{dataset}_{'|'.join(series)}")
        overlay = c1.multiselect("Overlay accuracies", [k for k in explore.ACCURACY_METRICS if k != metric],
                                 format_func=lambda k: explore.METRICS[k].label, key="ex_overlay",
                                 help="Draw other accuracy forms on the same axes (dashed).")
        st.plotly_chart(explore.curves_figure(rows, metric, chosen, overlay), key="ex_curves")
        st.dataframe(explore.sweep_frame(rows), hide_index=True)

with tab_pareto:
    search = explore.load_search(dataset)
    if search is None:
        st.info(f"No design-space search is shipped for {dataset} (`python -m engine search --dataset {dataset}`).")
    else:
        st.caption("Validation score against encrypted latency, one point per configuration of the search; hover "
                   "a point for its configuration. The chosen point (star) is the best stable one within the target.")
        st.plotly_chart(explore.pareto(search), key="ex_pareto")

with tab_new:
    if page.read_only():
        st.info("Read-only demo (ENGINE_READ_ONLY=1): new sweeps are disabled.", icon=":material/lock:")
    elif dataset not in present_datasets(page.data_dir()):
        st.warning(f"No {dataset} file in {page.data_dir()}: a new sweep needs the dataset. Put the official "
                   f"`{dataset}.npz` there or set MEDMNIST_DIR; the shipped curves above need nothing.")
    else:
        base_model = saved.config if saved is not None and saved.dataset == dataset else None
        with st.form("sweep_form"):
            c1, c2 = st.columns(2)
            hidden_text = c1.text_input("Hidden widths", ",".join(map(str, base_model.model.hidden)) if base_model else "16", key="sw_hidden")
            epochs = c1.number_input("Epochs per point", 1, 200, base_model.train.epochs if base_model else 5, key="sw_epochs")
            limit = c1.number_input("Training images (0 = all)", 0, 1_000_000, 0, key="sw_limit")
            bits = c2.slider("Bit-widths", 2, 8, (2, 8), key="sw_bits")
            rounding = c2.multiselect("Rounding threshold bits", [3, 4, 5, 6, 7, 8], default=[5, 6], key="sw_rounding")
            n_val = c2.number_input("Validation images (0 = all)", 0, 100_000, 0, key="sw_nval")
            n_fhe = c2.number_input("Images through real encryption (0 = skip)", 0, 50, 3, key="sw_nfhe")
            go_btn = st.form_submit_button("Run sweep", type="primary")
        if go_btn:
            try:
                hidden = ModelConfig.parse_hidden(hidden_text)
                if base_model is not None:
                    base = base_model.replace(data=page.data_config(dataset),
                                              model=ModelConfig(hidden, input_pool=base_model.model.input_pool,
                                                                input_levels=base_model.model.input_levels),
                                              train=dataclasses.replace(base_model.train, epochs=int(epochs),
                                                                        limit_train=int(limit), seeds=1))
                else:
                    base = PipelineConfig(data=page.data_config(dataset), model=ModelConfig(hidden=hidden),
                                          train=TrainConfig(epochs=int(epochs), limit_train=int(limit)), compile=CompileConfig())
                new_rows = st.session_state.setdefault("ex_new_rows", {}).setdefault(dataset, [])
                with jobs.long_job("sweep"):
                    bar = st.progress(0.0, text="Sweeping")
                    chart = st.empty()
                    points = explore.sweep_points(base, list(range(bits[0], bits[1] + 1)), sorted(rounding) or [5])
                    for k, (label, row) in enumerate(explore.run_points(points, int(n_val), int(n_fhe))):
                        new_rows.append(row)
                        bar.progress((k + 1) / len(points), text=f"{k + 1}/{len(points)} done: {label}")
                        chart.plotly_chart(explore.curves_figure(new_rows, "simulate_accuracy", None, ["float_accuracy"]),
                                           key=f"ex_live_{k}")
                st.session_state["ex_flash"] = f"{len(points)} points measured; they are in the Curves tab (marked 'new')."
                st.rerun()  # the Curves tab, drawn above, now includes them
            except (DataError, ValueError) as exc:
                page.fail(exc)
        if "ex_flash" in st.session_state:
            st.success(st.session_state.pop("ex_flash"))
        if st.session_state.get("ex_new_rows", {}).get(dataset):
            st.dataframe(explore.sweep_frame(st.session_state["ex_new_rows"][dataset]), hide_index=True)
