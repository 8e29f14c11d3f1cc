"""Gallery of test images; run the chosen ones in the four modes side by side."""

import numpy as np
import streamlit as st

from dashboard import circuits, jobs, page, tables
from engine.learn.metrics import label_text
from engine.study.infer import MODES
from engine.learn.data import gallery_split

saved, cc, info = page.model_page("Encrypted inference", "Encrypted inference: four modes side by side")
split, source = gallery_split(page.data_config(saved.dataset))
truth = [label_text(info, split.targets[i]) for i in range(len(split))]
st.caption(f"Gallery: {source}")

c1, c2, c3 = st.columns([2, 1, 1])
classes = ["all"] + sorted(set(truth))
cls = c1.selectbox("Filter by true class", classes, key="inf_class")
pool = [i for i in range(len(split)) if cls == "all" or truth[i] == cls]
page_size = 24
n_pages = max(1, (len(pool) + page_size - 1) // page_size)
gallery_page = c2.number_input("Gallery page", 1, n_pages, 1, key="inf_page")
if c3.button("Random pick", icon=":material/casino:", key="inf_random"):
    rng = np.random.default_rng()
    st.session_state["inf_selected"] = sorted(rng.choice(pool, size=min(3, len(pool)), replace=False).tolist())
shown = pool[(gallery_page - 1) * page_size : gallery_page * page_size]
cols = st.columns(8)
for k, i in enumerate(shown):
    cols[k % 8].image(split.images[i], caption=f"#{i}: {truth[i]}", width=72, clamp=True)

default = [i for i in st.session_state.get("inf_selected", pool[:2]) if i in pool]
selected = st.multiselect("Images to classify", pool, default=default, key="inf_pick", format_func=lambda i: f"#{i} ({truth[i]})")
modes = st.multiselect("Modes", MODES, default=list(MODES), key="inf_modes", format_func=tables.MODE_LABELS.get)

if st.button("Run", type="primary", key="inf_run", disabled=not selected or not modes):
    try:
        with st.spinner("Preparing circuit and this session's keys…"):
            p = circuits.predictor(saved, cc)
        bar, update = jobs.progress_bar("Running")
        results = p.run(split.images[selected], modes, progress=update)
        bar.empty()
        st.session_state["inf_results"] = (selected, results)
    except Exception as exc:  # noqa: BLE001
        page.fail(exc)

if "inf_results" in st.session_state:
    sel, results = st.session_state["inf_results"]
    df = tables.results_table(results, info, [truth[i] for i in sel], guard=circuits.guard(saved))
    df["image"] = [f"#{sel[i]}" for i in df["image"]]
    st.subheader("Predictions and timings")
    st.dataframe(df, hide_index=True)
    st.caption("Agreement: " + tables.agreement_text(results))
    if tables.sizes_text(results):
        st.caption(tables.sizes_text(results))
    med = {tables.MODE_LABELS[m]: f"{1000 * np.median(r.latency_s):.1f} ms" for m, r in results.items()}
    st.write("Median latency per image:", med)
