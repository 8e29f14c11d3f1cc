"""Validate the model on your own labelled images: a zip of class folders through the upload path, encrypted."""

import pandas as pd
import streamlit as st

from dashboard import circuits, figures, jobs, page, points
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
                                   source=up.name, point=points.current(saved))
        bar.empty()
        st.session_state["validate_report"] = (key, report)
    except Exception as exc:  # noqa: BLE001
        page.fail(exc)


def ci(v, interval) -> str:
    return "-" if v is None else f"{100 * v:.1f}% ({validate.pct(interval[0])}–{validate.pct(interval[1])})"


def operating_point_section(report: dict) -> None:
    """ROC, the table at candidate thresholds with 95% intervals, and choosing a point (binary datasets)."""
    from engine.study import operating

    op = report.get("operating")
    if not op or op["roc"] is None:
        return
    finding = report["labels"][op["finding"]]
    st.subheader("Operating point")
    st.markdown(f"How the answers trade {finding} recall (sensitivity) against false alarms on **your {op['n']} images** "
                f"({op['positives']} {finding}, {op['negatives']} other). Intervals: 95% bootstrap "
                f"({op['bootstrap']} resamples). The point is chosen here, kept in this browser session and never sent "
                f"to the server; it does not retrain the model. Answers now: **{report['decided_by']}**.")
    at = report.get("at_point")
    if at and at.get("sensitivity") is not None:
        st.info(f"At the operating point in force: sensitivity {ci(at['sensitivity'], at['sensitivity_ci'])}, "
                f"specificity {ci(at['specificity'], at['specificity_ci'])}, PPV {validate.pct(at['ppv'])}, "
                f"NPV {validate.pct(at['npv'])} over {at['answered']} answered images; {at['referred']} referred "
                "to a radiologist.", icon=":material/rule:")
    left, right = st.columns(2)
    left.plotly_chart(figures.roc_figure(report, points.current(saved)), key="validate_roc")
    rows = pd.DataFrame([{"P(" + finding + ") ≥": r["threshold"], "sensitivity": ci(r["sensitivity"], r["sensitivity_ci"]),
                          "specificity": ci(r["specificity"], r["specificity_ci"]), "PPV": ci(r["ppv"], r["ppv_ci"]),
                          "NPV": ci(r["npv"], r["npv_ci"])} for r in op["table"]])
    right.dataframe(rows, hide_index=True, height=340)
    with st.form("validate_choose"):
        c1, c2, c3 = st.columns(3)
        by = c1.radio("Choose by", [f"{finding} recall", "specificity", "a row of the table"], key="validate_point_by")
        target = c2.number_input("Target (recall or specificity)", 0.5, 1.0, 0.95, 0.01, key="validate_point_target")
        row = c2.selectbox("Row (threshold)", [r["threshold"] for r in op["table"]], index=9, key="validate_point_row")
        band = c3.checkbox("Refer band: answer 'refer to a radiologist' between two thresholds", key="validate_point_refer")
        lo, hi = c3.slider(f"Refer when P({finding}) is in", 0.0, 1.0, (0.4, 0.6), 0.01, key="validate_point_band")
        chosen = st.form_submit_button("Use this operating point", icon=":material/rule:")
    if chosen:
        rows_ = report["images"]
        labels = [r["label"] for r in rows_]
        probs = [r["finding_probability"] for r in rows_]
        import numpy as np

        try:
            kw = ({"target_recall": target} if by.endswith("recall") else {"target_specificity": target}
                  if by == "specificity" else {})
            point = operating.make_point(saved, info, np.asarray(labels), np.asarray(probs), [f for f in files if f.error is None],
                                         refer=[lo, hi] if band else None, calibrated=report["calibrated"], source=up.name,
                                         threshold=None if kw else float(row), **kw)
            points.use(saved, point)
            st.success(f"In force for this session: {point.describe()}. Validate again to audit it on these images.")
        except operating.PointError as exc:
            st.error(str(exc))
    point = points.current(saved)
    if point is not None:
        st.download_button("Download the operating point (JSON)", point.to_json().encode(),
                           file_name=f"operating_point_{saved.dataset}.json", mime="application/json",
                           icon=":material/download:", key="validate_point_download")
        if st.button("Back to argmax (drop the point)", key="validate_point_clear"):
            points.clear(saved)
            st.rerun()


with st.expander("Load an operating point saved earlier (JSON)", icon=":material/upload:"):
    saved_point = st.file_uploader("Operating point", type=["json"], key="validate_point_file")
    if saved_point is not None:
        from engine.study.operating import PointError

        try:
            st.success(f"In force for this session: {points.load(saved, saved_point.getvalue()).describe()}.")
        except PointError as exc:
            st.error(str(exc))

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
operating_point_section(report)
columns = ["file", "label_name", "prediction_name"] + (["decision"] if "at_point" in report else []) + [
    "right", "confidence", "uncertain", "flagged", "warning"]
table = pd.DataFrame(report["images"])[columns].rename(columns={"label_name": "true", "prediction_name": "prediction",
                                                               "decision": "decision (operating point)"})
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
