"""Train a QAT FCNN on a MedMNIST subset, your own labelled images, or both, with live progress, and manage saved models."""

from dataclasses import replace as _replace

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashboard import jobs, page
from engine.learn.data import available_datasets, present_datasets
from engine.learn import registry
from engine.config import ModelConfig
from engine.learn import pipeline
from engine.learn.data import DataError, locate
from engine.learn.recipes import RecipeError, recipe

st.set_page_config(page_title="Train", page_icon=page.FAVICON, layout="wide")
st.title("Train a quantization-aware model")

if page.read_only():
    st.info("This is a read-only demo (ENGINE_READ_ONLY=1): training is disabled. Try the encrypted inference pages.",
            icon=":material/lock:")
    st.stop()
present = present_datasets(page.data_dir())
choices = present + [d for d in available_datasets() if d not in present]
dataset = st.selectbox("MedMNIST subset", choices, key="train_dataset",
                       format_func=lambda d: d + ("" if d in present else " (download)"))
try:
    rec, source = recipe(dataset)
except RecipeError as exc:
    st.error(str(exc), icon=":material/error:")
    st.stop()
if st.session_state.get("train_recipe_for") != dataset:  # a new dataset: start from its recipe
    m, t = rec["model"], rec["train"]
    st.session_state.update({
        "train_recipe_for": dataset, "train_hidden": ",".join(map(str, m.hidden)), "train_epochs": t.epochs,
        "train_wbits": m.weight_bits, "train_abits": m.act_bits, "train_ibits": m.input_bits,
        "train_prune": m.max_active_inputs, "train_pool": m.input_pool, "train_augment": t.augment_shift,
        "train_rotate": float(t.augment_rotate), "train_zoom": t.augment_scale, "train_levels": m.input_levels,
        "train_seeds": t.seeds,
        "train_lr": t.lr,
    })
SOURCES = ("MedMNIST subset", "MedMNIST + my labelled images (.zip)", "only my labelled images (.zip)")
data_source = st.radio("Training data", SOURCES, key="train_source", horizontal=True,
                       help="Your images: a .zip with one folder per class (named after the label or its index, as on "
                            "the Validate page). Each image goes through the upload path and is augmented on its full-size "
                            "image; 10% of each class is held out for validation.")
own_zip, label_map = None, ""
if data_source != SOURCES[0]:
    c1, c2 = st.columns([2, 1])
    own_zip = c1.file_uploader("Labelled images (.zip, one folder per class)", type=["zip"], key="train_zip")
    label_map = c2.text_input("Label map (optional)", "", key="train_label_map", placeholder="NORMAL=0,PNEUMONIA=1",
                              help="for class folders named otherwise than the labels: NAME=INDEX pairs")
st.caption(f"Defaults: {source}. Compiled with rounding to {rec['compile'].rounding_threshold_bits} bits and "
           f"p_error {rec['compile'].p_error:g}, the stable settings the search chose.")
with st.form("train_form"):
    c1, c2 = st.columns(2)
    hidden_text = c1.text_input("Hidden widths (comma separated, empty = linear)", key="train_hidden")
    epochs = c1.number_input("Epochs", 1, 200, key="train_epochs")
    name = c1.text_input("Model name (empty = automatic)", "", key="train_name")
    wbits = c2.slider("Weight bits", 2, 8, key="train_wbits")
    abits = c2.slider("Activation bits", 2, 8, key="train_abits")
    ibits = c2.slider("Input bits", 2, 8, key="train_ibits")
    prune = c2.number_input("Max active inputs per neuron (0 = no pruning)", 0, 4096, key="train_prune")
    limit = c2.number_input("Use only the first N training images (0 = all)", 0, 1_000_000, 0, key="train_limit")
    pool = c1.selectbox("Client-side input pooling", sorted({1, 2, 3, 4, rec["model"].input_pool}), key="train_pool",
                        help="Average-pool the image before encryption: 2 -> 14x14 inputs, 3 -> 9x9 (fewer "
                             "ciphertexts: each costs about 0.15 ms to encrypt and as much again on the server)")
    augment = c1.number_input("Random shift augmentation (pixels)", 0, 4, key="train_augment")
    rotate = c1.number_input("Random rotation augmentation (degrees)", 0.0, 30.0, key="train_rotate")
    # the recipe's own values are among the choices: what the form shows is what it trains with
    zoom = c1.select_slider("Random zoom augmentation (±)", sorted({0.0, 0.05, 0.1, 0.15, 0.2, rec["train"].augment_scale}),
                            key="train_zoom")
    lr = c2.select_slider("Learning rate", sorted({3e-4, 1e-3, 2e-3, 3e-3, 1e-2, rec["train"].lr}), key="train_lr")
    levels = c1.number_input("Intensity levels per channel (0 = off)", 0, 32, key="train_levels",
                             help="Also send each channel's share of pixels brighter than N fixed levels, computed on "
                                  "the client like the pooling: a summary of the whole image in N inputs per channel")
    seeds = c2.number_input("Runs (the best on validation is kept)", 1, 5, key="train_seeds",
                            help="Train this many runs with different seeds and keep the one that scores best on "
                                 "validation: the runs of a pruned model differ by several points")
    quick = st.checkbox("Quick search: also try the recipe's variants and keep the best on validation", key="train_quick",
                        help="Trains the settings above and up to two variants of the client's preprocessing (without "
                             "the intensity levels; a coarser 7x7 grid), each as many runs as asked: up to three times "
                             "as long. The variants keep the recipe's bit-widths and pruning; runs whose circuit "
                             "stays at 6 bits (the faster one) go first.")
    submitted = st.form_submit_button("Train", type="primary")

if submitted and data_source != SOURCES[0] and own_zip is None:
    st.error("Upload a .zip of labelled images first (or choose “MedMNIST subset”).", icon=":material/error:")
    submitted = False


def form_config(images_path: str = ""):
    """The form's values over the dataset's recipe (every setting the form does not show kept):
    what Train trains."""
    data = page.data_config(dataset, allow_download=True)
    data = _replace(data, images=images_path, label_map=label_map, images_only=data_source == SOURCES[2])
    return pipeline.configure(
        data, model=dict(hidden=ModelConfig.parse_hidden(hidden_text), weight_bits=wbits, act_bits=abits,
                         input_bits=ibits, max_active_inputs=int(prune), input_pool=pool, input_levels=int(levels)),
        train=dict(epochs=int(epochs), lr=float(lr), limit_train=int(limit), augment_shift=int(augment),
                   augment_rotate=float(rotate), augment_scale=float(zoom), seeds=int(seeds)))[0]


with st.expander("Every setting this trains with (the recipe with the values above)", icon=":material/tune:"):
    try:
        st.json(form_config("your labelled images" if own_zip is not None else "").to_dict(), expanded=True)
    except ValueError as exc:
        st.caption(str(exc))
if submitted:
    try:
        cfg = form_config(page.store_upload(own_zip.name, own_zip.getvalue()) if own_zip is not None else "")
        locate(cfg.data)  # a missing file fails here, before the progress bar
        bar = st.progress(0.0, text="training…")
        chart = st.empty()
        history = []

        def on_epoch(r):
            history.append(r)
            bar.progress(r.epoch / r.epochs, text=f"epoch {r.epoch}/{r.epochs}: val accuracy {100 * r.val_accuracy:.1f}%")
            chart.plotly_chart(_history_figure(history), key=f"hist_{r.epoch}")

        def _history_figure(hist):
            fig = go.Figure()
            ep = [h.epoch for h in hist]
            fig.add_scatter(x=ep, y=[h.train_loss for h in hist], name="train loss")
            fig.add_scatter(x=ep, y=[h.val_loss for h in hist], name="val loss")
            fig.add_scatter(x=ep, y=[h.val_accuracy for h in hist], name="val accuracy", yaxis="y2")
            fig.update_layout(xaxis_title="epoch", yaxis_title="loss", height=320, margin=dict(t=20),
                              yaxis2=dict(title="accuracy", overlaying="y", side="right", range=[0, 1]))
            return fig

        with jobs.long_job("training"):
            ibar = st.progress(0.0, text="preparing your images…") if cfg.data.images else None

            def on_images(done, total):
                ibar.progress(done / max(total, 1), text=f"preparing your images: {done}/{total}")

            def on_prepared(images):
                st.caption(f"{len(images.names)} labelled images ({len(images.unreadable)} unreadable): "
                           f"{len(images.train_index)} to train on, {len(images.holdout_index)} held out for validation.")

            trained = pipeline.run(cfg, name.strip() or None, quick_search=quick,
                                   hooks=pipeline.Hooks(on_epoch, on_images, on_prepared))
            result, saved = trained.result, trained.saved
        st.session_state["model"] = (saved.dataset, saved.name)
        held = (f", your held-out images {100 * result.metrics['holdout']['accuracy']:.1f}%"
                if "holdout" in result.metrics else "")
        st.success(f"Saved **{saved.dataset}/{saved.name}** (best epoch {result.best_epoch}): validation accuracy "
                   f"{100 * result.metrics['val']['accuracy']:.1f}%{held}, test {100 * result.metrics['test']['accuracy']:.1f}%. "
                   "It is now the selected model: compile it on the Compile page, then check it on the Validate page.")
        if "quick_search" in result.metrics:
            st.dataframe(pd.DataFrame([{"variant": r["variant"], "validation accuracy": f"{100 * r['val_accuracy']:.1f}%",
                                        "chosen": r["variant"] == result.metrics["quick_search_chosen"]}
                                       for r in result.metrics["quick_search"]]), hide_index=True)
        if "seeds" in result.metrics:
            st.caption(f"Kept seed {result.metrics['chosen_seed']} of {len(result.metrics['seeds'])} runs "
                       f"(validation accuracy spread {100 * result.metrics['seed_spread']:.1f} points).")
        st.caption(f"Learned from: {saved.sources_text()}")
    except (DataError, ValueError, FileExistsError) as exc:
        page.fail(exc)
    except Exception as exc:  # noqa: BLE001 - a bad archive (LabelError) and the like: one clear message
        page.fail(exc)

st.subheader("Saved models")
models = registry.list_models()
if models:
    st.dataframe(pd.DataFrame([m.summary() for m in models]), hide_index=True)
    options = [f"{m.dataset}/{m.name}" for m in models]
    pick = st.selectbox("Use model", options, key="train_use")
    if st.button("Use this model", key="train_use_btn"):
        ds, nm = pick.split("/", 1)
        st.session_state["model"] = (ds, nm)
        st.success(f"Selected {pick} for the other pages.")
else:
    st.info("No saved models yet.")
