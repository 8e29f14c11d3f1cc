"""Upload an image; see what the model sees; get an encrypted prediction."""

import streamlit as st

import ui
from engine.images import EXTENSIONS, ImageError, load_image

saved, cc, info = ui.model_page("Upload", ":material/upload:", "Classify your own image, encrypted")
size, channels = saved.config.data.size, info.n_channels
st.markdown(
    f"Model **{saved.name}** expects {size}×{size} {'grayscale' if channels == 1 else 'RGB'} "
    f"{saved.dataset} images. Accepted: PNG, JPEG, BMP, TIFF, GIF (first frame) or a `.npy` array. "
    "Non-square images are center-cropped, then resized; transparency is composited onto black; "
    "16-bit and float data are rescaled to 0–255."
)
pool = saved.config.model.input_pool
if pool > 1:
    st.caption(f"Before encrypting, the client averages {pool}×{pool} pixel blocks: "
               f"{(size // pool) ** 2 * channels} encrypted inputs per image.")
up = st.file_uploader("Image", type=list(EXTENSIONS), key="upload_file")
if up is not None:
    try:
        loaded = load_image(up.getvalue(), size, channels, name=up.name)
    except ImageError as exc:
        st.error(str(exc))
        st.stop()
    c1, c2 = st.columns(2)
    c1.image(loaded.original, caption=f"uploaded ({loaded.original.shape[1]}×{loaded.original.shape[0]})",
             width=240, clamp=True)
    c2.image(loaded.array, caption=f"model input ({size}×{size})", width=240, clamp=True)
    for note in loaded.notes:
        st.caption(f"ℹ️ {note}")
    if st.button("Encrypted prediction", icon=":material/lock:", type="primary", key="upload_run"):
        try:
            with st.spinner("Encrypting, computing on ciphertext, decrypting…"):
                p = ui.predictor(saved, cc)
                results = p.run(loaded.array[None], ["fhe"])
            fhe = results["fhe"]
            st.success(f"Encrypted prediction: **{ui.label_text(info, fhe.predictions[0])}**")
            if not info.multi_label:
                st.bar_chart({info.labels[c]: float(fhe.scores[0, c]) for c in info.labels}, horizontal=True)
            st.dataframe(ui.results_table(results, info), hide_index=True)
            st.caption(ui.sizes_text(results))
        except Exception as exc:  # noqa: BLE001
            ui.fail(exc)
