"""Validate the model on your own labelled images: a zip of class folders through the upload path, encrypted."""

import pandas as pd
import streamlit as st

from dashboard import circuits, figures, jobs, page
from engine.study import validate
from engine.learn.images import ImageError, load_image

saved, cc, info = page.model_page("Validate", "Validate on your own labelled images")
names = "; ".join(f"`{n}` ({i})" for i, n in info.labels.items())
st.markdown(
    f"Upload a `.zip` with **one folder per class**, named after {saved.dataset}'s labels or their index: {names}. "
    "Other folder names can be mapped below. Every image goes through exactly the Upload page's path: decoded "
    "(PNG, JPEG, TIFF, DICOM, …), cropped and resized, checked against the training images, **encrypted in this "
    "browser session's client**, classified on ciphertext by the service, decrypted here. DICOM files give up "
    "their pixels only: no header field (patient, study, institution) is shown, stored or sent.")
if info.multi_label:
    st.warning(f"{saved.dataset} is multi-label: one folder per class cannot say an image's labels.")
    st.stop()
mapping = st.text_input("Map other folder names (optional)", placeholder="e.g. NORMAL=0,PNEUMONIA=1", key="validate_map")
up = st.file_uploader("Labelled images (.zip)", type=["zip"], key="validate_zip")
if up is None:
    st.stop()
try:
    files = validate.read_labelled(up.getvalue(), info, validate.parse_label_map(mapping), name=up.name)
except (validate.LabelError, ImageError) as exc:
    st.error(str(exc))
    st.stop()
counts = pd.Series([info.labels.get(f.label, "no class folder") for f in files]).value_counts()
st.write(f"**{len(files)} files**: " + ", ".join(f"{n} {lbl}" for lbl, n in counts.items()) + ".")

key = (saved.hash, up.name, up.size, mapping)
if st.button(f"Validate {len(files)} images, encrypted", icon=":material/lock:", type="primary", key="validate_run"):
    try:
        bar, update = jobs.progress_bar("Encrypting and classifying")
        report = validate.validate(circuits.predictor(saved, cc), circuits.guard(saved), files, ["fhe"], progress=update,
                                   source=up.name)
        bar.empty()
        st.session_state["validate_report"] = (key, report)
    except Exception as exc:  # noqa: BLE001
        page.fail(exc)
stored = st.session_state.get("validate_report")
if not stored or stored[0] != key:
    st.stop()
report = stored[1]
if not report["n"]:
    st.error("No image could be read: " + "; ".join(f"{u['file']}: {u['reason']}" for u in report["unreadable"]))
    st.stop()
m = report["modes"]["fhe"]
c = st.columns(4)
c[0].metric("Accuracy (encrypted)", f"{100 * m['accuracy']:.1f}%")
c[1].metric("Balanced accuracy", f"{100 * m['balanced_accuracy']:.1f}%")
c[2].metric("AUC", "-" if m["auc"] is None else f"{m['auc']:.3f}")
c[3].metric("Flagged as unlike the training images", f"{100 * report['flagged_share']:.1f}%")
st.markdown("**Recall per class**: " + " · ".join(f"{lbl} {'-' if v is None else f'{100 * v:.1f}%'}"
                                                   for lbl, v in m["recall"].items()))
st.caption(f"Accuracy of the flagged images: {validate.pct(report['accuracy_flagged'])}, of those that passed: "
           f"{validate.pct(report['accuracy_passed'])}. Answers at {'calibrated ' if report['calibrated'] else ''}"
           f"confidence ≥ 90%: {validate.pct(report['confident_share'])} of images, "
           f"{validate.pct(report['accuracy_confident'])} right.")
left, right = st.columns(2)
left.plotly_chart(figures.confusion_figure(report), key="validate_confusion")
right.plotly_chart(figures.reliability_figure(report), key="validate_reliability")
table = pd.DataFrame(report["images"])[["file", "label_name", "prediction_name", "right", "confidence", "uncertain",
                                        "flagged", "warning"]].rename(columns={"label_name": "true",
                                                                               "prediction_name": "prediction"})
st.dataframe(table, hide_index=True)
st.download_button("Download CSV", table.to_csv(index=False).encode(), file_name=f"validation_{saved.dataset}.csv",
                   mime="text/csv", icon=":material/download:", key="validate_csv")
for u in report["unreadable"]:
    st.caption(f"Not classified: {u['file']}: {u['reason']}")
wrong = [im for im in report["images"] if not im["right"]]
if wrong:
    st.subheader(f"Wrong answers ({len(wrong)})")
    data = {f.name: f.data for f in files}
    shown = wrong[:24]
    cols = st.columns(6)
    for i, im in enumerate(shown):
        pic = load_image(data[im["file"]], saved.config.data.size, info.n_channels, name=im["file"]).original
        cols[i % 6].image(pic, caption=f"{im['file'].rsplit('/', 1)[-1]}: true {im['label_name']}, "
                                       f"said {im['prediction_name']} ({100 * im['confidence']:.0f}%)", clamp=True)
    if len(wrong) > len(shown):
        st.caption(f"… and {len(wrong) - len(shown)} more in the table.")
