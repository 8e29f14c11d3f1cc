"""Accuracy and latency of the four modes across stored results, against the published reference."""

import numpy as np
import pandas as pd
import plotly.express as px
import streamlit as st

from dashboard import page
from engine.learn import registry
from engine.study.evaluate import load_reports, report_rows, results_dir, target_rows

st.set_page_config(page_title="Benchmarks", page_icon=page.FAVICON, layout="wide")
st.title("Benchmarks")
ref = page.REFERENCE
st.markdown(
    f"Stored results from `python -m engine bench` / `evaluate --json` in `{results_dir()}`. "
    f"Dotted lines: the published reference ({100 * ref['plaintext_accuracy']:.1f}% plaintext, "
    f"{100 * ref['encrypted_accuracy']:.1f}% encrypted, {1000 * ref['latency_s']:.0f} ms per image)."
)
reports = load_reports()
df = pd.DataFrame(report_rows(reports))
if df.empty:
    st.info("No stored results yet: run `python -m engine bench --dataset pneumoniamnist`.")
    st.stop()
rounding = df["rounding_bits"].map(lambda b: "" if pd.isna(b) else f" r{int(b)}")
df["run"] = df["dataset"] + " / " + df["model"] + rounding + " (n=" + df["n"].astype(str) + ")"
fig = px.bar(df, x="mode", y="accuracy", color="run", barmode="group", range_y=[0.5, 1.0], height=380,
             labels={"accuracy": "test accuracy", "mode": "inference mode"})
fig.update_yaxes(tickformat=".0%")
fig.add_hline(y=ref["plaintext_accuracy"], line_dash="dot", annotation_text="reference plaintext 88.2%")
fig.add_hline(y=ref["encrypted_accuracy"], line_dash="dash", annotation_text="reference encrypted 87.5%",
              annotation_position="bottom right")
st.plotly_chart(fig, key="bench_acc")
fig2 = px.bar(df, x="mode", y="latency_median_ms", color="run", barmode="group", log_y=True, height=380,
              labels={"latency_median_ms": "median latency per image (ms, log)"})
# A line trace in data coordinates (hline shapes and their annotations disagree on log axes).
modes = list(dict.fromkeys(df["mode"]))
fig2.add_scatter(x=modes, y=[1000 * ref["latency_s"]] * len(modes), mode="lines", line=dict(dash="dot", color="black"),
                 name="reference 150 ms")
# One labelled tick per decade (plotly's default log ticks read "2, 5, 10, 2, 5, 100, ...").
lo, hi = df["latency_median_ms"].min(), max(df["latency_median_ms"].max(), 1000 * ref["latency_s"])
decades = [10.0**k for k in range(int(np.floor(np.log10(max(lo, 1e-3)))), int(np.ceil(np.log10(hi))) + 1)]
fig2.update_yaxes(tickvals=decades, ticktext=[f"{v:g} ms" for v in decades], title="median latency per image (ms, log scale)")
fig2.update_xaxes(title="inference mode")
st.plotly_chart(fig2, key="bench_lat")
st.dataframe(df.drop(columns=["run"]), hide_index=True)
st.download_button("Download table (CSV)", df.drop(columns=["run"]).to_csv(index=False), "benchmarks.csv", "text/csv",
                   key="bench_csv")

targets = target_rows(reports)
if targets:
    st.subheader("Targets (from the benchmark runs)")
    st.dataframe(pd.DataFrame(targets), hide_index=True)

st.subheader("What each saved model learned from")
models = registry.list_models()
if models:
    st.dataframe(pd.DataFrame([{"model": f"{m.dataset}/{m.name}", "learned from": m.sources_text(),
                                "held-out images accuracy (float)": m.metrics.get("holdout", {}).get("accuracy")}
                               for m in models]), hide_index=True)
