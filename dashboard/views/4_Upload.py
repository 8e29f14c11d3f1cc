"""Upload images; see what the model sees; encrypted predictions with guardrails (one or a batch)."""

import pandas as pd
import streamlit as st

from dashboard import circuits, jobs, page, points, tables
from engine.learn.metrics import label_text
from engine.learn import screening
from engine.learn.images import EXTENSIONS, ImageError

saved, cc, info = page.model_page("Upload", "Classify your own images, encrypted")
size, channels = saved.config.data.size, info.n_channels
st.markdown(
    f"Model **{saved.name}** expects {size}×{size} {'grayscale' if channels == 1 else 'RGB'} "
    f"{saved.dataset} images. Accepted: PNG, JPEG, BMP, TIFF, GIF (first frame), DICOM (pixels only: no header field is shown, stored or sent), a `.npy` array, or a "
    "`.zip` of them; several files give one table. Non-square images are center-cropped, then resized; "
    "transparency is composited onto black; 16-bit and float data are rescaled to 0–255."
)
st.caption(f"Feature stage, computed by this browser session's client in the clear on the {size}×{size} image: "
           f"{saved.stage_text()}. Only the encrypted values leave it.")
guard = circuits.guard(saved)
if guard is None:
    st.caption("No input check for this model: its guard file is missing and the dataset is not on this machine.")
else:
    st.caption(f"Before encrypting, this browser session's client checks that each image resembles {saved.dataset}'s "
               f"training images ({100 * guard.val_pass_rate:.1f}% of real validation images pass); the server "
               "never sees the image.")

ups = st.file_uploader("Images", type=[*EXTENSIONS, "zip"], accept_multiple_files=True, key="upload_files")
if not ups:
    st.stop()
try:
    items = screening.screen([(u.name, u.getvalue()) for u in ups], guard, size, channels)
except ImageError as exc:
    st.error(str(exc))
    st.stop()


def warn(item) -> None:
    if item.verdict is not None and item.verdict.foreign:
        st.warning(f"**{item.name}** does not look like a {saved.dataset} image: {item.verdict.message}. "
                   "The prediction below is still available, but it is not meaningful for such an input.",
                   icon=":material/warning:")


if len(items) == 1:
    item = items[0]
    if item.error:
        st.error(item.error)
        st.stop()
    c1, c2 = st.columns(2)
    c1.image(item.original, caption=f"uploaded ({item.original.shape[1]}×{item.original.shape[0]})",
             width=240, clamp=True)
    c2.image(item.image, caption=f"what the feature stage reads ({size}×{size})", width=240, clamp=True)
    for note in item.notes:
        st.caption(note)
    warn(item)
    if st.button("Encrypted prediction", icon=":material/lock:", type="primary", key="upload_run"):
        try:
            with st.spinner("Encrypting, computing on ciphertext, decrypting…"):
                p = circuits.predictor(saved, cc)
                results = p.run(item.image[None], ["fhe"])
            fhe = results["fhe"]
            st.success(f"Encrypted prediction: **{label_text(info, fhe.predictions[0])}** · {tables.confidence_text(saved, fhe.logits[0], item.verdict)}")
            st.markdown(tables.decision_text(saved, fhe.logits[0], info, item.verdict))
            if not info.multi_label and not (item.verdict is not None and item.verdict.foreign):
                probs = guard.confidence(fhe.logits[0]).probabilities if guard is not None else fhe.scores[0]
                st.bar_chart(pd.DataFrame({"class": [info.labels[c] for c in info.labels],
                                           "probability (calibrated)": [float(probs[c]) for c in info.labels]}),
                             x="class", y="probability (calibrated)", horizontal=True)
            st.dataframe(tables.results_table(results, info), hide_index=True)
            st.caption(tables.sizes_text(results))
        except Exception as exc:  # noqa: BLE001
            page.fail(exc)
    st.stop()

# -- a batch: one table
good = [it for it in items if it.error is None]
flagged = sum(1 for it in good if it.verdict is not None and it.verdict.foreign)
st.write(f"{len(items)} files: {len(good)} images" + (f", {len(items) - len(good)} unreadable" if len(good) < len(items) else "")
         + (f", {flagged} flagged as unlike the training data" if flagged else "") + ".")
if st.button(f"Encrypted predictions for {len(good)} images", icon=":material/lock:", type="primary",
             key="upload_batch_run", disabled=not good):
    try:
        import numpy as np

        p = circuits.predictor(saved, cc)
        bar, update = jobs.progress_bar("Encrypting and classifying")
        fhe = p.run(np.stack([it.image for it in good]), ["fhe"], progress=update)["fhe"]
        st.session_state["upload_batch"] = (saved.hash, [it.name for it in items],
                                            tables.batch_table(items, fhe, info, guard, saved), points.in_force(saved))
    except Exception as exc:  # noqa: BLE001
        page.fail(exc)
batch = st.session_state.get("upload_batch")
if batch and batch[0] == saved.hash and batch[1] == [it.name for it in items]:
    table = batch[2]
    st.caption(f"Answers decided by {batch[3]}.")
    st.dataframe(table, hide_index=True)
    SHOWN = 24
    with st.expander(f"Each image and the {size}×{size} picture the model saw"
                     + (f" (the first {SHOWN})" if len(good) > SHOWN else ""), icon=":material/image:"):
        answers = dict(zip(table["file"], table["prediction"]))
        for row_items in [good[i:i + 4] for i in range(0, min(len(good), SHOWN), 4)]:
            cols = st.columns(8)
            for k, it in enumerate(row_items):
                cols[2 * k].image(it.original, caption=it.name.rsplit("/", 1)[-1][:24], width=110, clamp=True)
                cols[2 * k + 1].image(it.image, caption=f"→ {answers.get(it.name, '')}", width=110, clamp=True)
    st.download_button("Download CSV", table.to_csv(index=False).encode(), file_name=f"encrypted_predictions_{saved.dataset}.csv",
                       mime="text/csv", icon=":material/download:", key="upload_csv")
