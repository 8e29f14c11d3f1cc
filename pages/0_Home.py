"""Home: what the system does, the state of model / circuit / keys, and a first encrypted prediction."""

import streamlit as st

import ui
from engine.data import gallery_split

st.title("Encrypted medical image classification")
st.markdown(
    "A hospital keeps its images private while still using a third party's model. **The client** "
    "(hospital) quantizes and encrypts an image with its own secret key; **the server** runs a "
    "quantization-aware neural network compiled to a TFHE circuit *directly on the ciphertext*; "
    "only the client can decrypt the prediction. The server never sees the image or the result."
)
# The flow as plain elements: a graphviz chart took about 4 s to render in a headless browser
# here, on every rerun, and held back everything below it.
steps = [("Image", "stays at the hospital"), ("Client: quantize + encrypt", "the secret key stays here"),
         ("Server: FHE circuit", "computes on the ciphertext with evaluation keys only"),
         ("Client: decrypt", "only the secret key opens the result"), ("Prediction", "seen by the hospital only")]
for col, (head, note) in zip(st.columns(len(steps)), steps):
    with col.container(border=True):
        st.markdown(f"**{head}**")
        st.caption(note)

saved = ui.select_model()
if saved is None:
    st.stop()
cc = saved.config.compile
info = ui.dataset_info(saved.dataset)
ui.prepare_keys(saved)  # key generation starts now, in the background

col1, col2, col3 = st.columns(3)
m = saved.metrics
col1.metric("Model", saved.name, help=f"{saved.dataset}, hidden {list(saved.config.model.hidden)}")
col1.caption(f"Validation accuracy {100 * m['val']['accuracy']:.1f}% · test {100 * m['test']['accuracy']:.1f}% (float)")
remote = ui.session_remote(saved, wait=False)
col2.metric("Server", "ready", help=ui.service_url())
col2.caption(f"Runs at {ui.service_url()} · {ui.service_origin()}")
col3.metric("This session's keys", "generated" if remote is not None else "generating…")
if remote is not None:
    col3.caption(f"Evaluation keys uploaded once ({remote.evaluation_key_bytes / 2**20:.1f} MiB); "
                 "this session now holds only its secret keys.")

st.subheader("Try it: encrypted prediction on a sample image")
split, source = gallery_split(ui.data_config(saved.dataset))
idx = st.number_input(f"Sample index ({source})", 0, len(split) - 1, 0, key="home_index")
img = split.images[int(idx)]
left, right = st.columns([1, 3])
left.image(img, caption=f"true: {ui.label_text(info, split.targets[int(idx)])}",
           width=160, clamp=True)
if right.button("Encrypt and classify", icon=":material/lock:", type="primary", key="home_run"):
    try:
        with st.spinner("Encrypting, sending the ciphertext to the server, decrypting the answer…"):
            p = ui.predictor(saved, cc)
            st.session_state["home_result"] = (saved.hash, int(idx), p.run(img[None], ["fhe"]))
        if remote is None:
            st.rerun()  # the status row above still says "generating…"
    except Exception as exc:  # noqa: BLE001 - shown to the user, never a traceback
        ui.fail(exc)
last = st.session_state.get("home_result")
if last and last[0] == saved.hash and last[1] == int(idx):
    _, _, results = last
    fhe = results["fhe"]
    right.success(f"Encrypted prediction: **{ui.label_text(info, fhe.predictions[0])}** "
                  f"({1000 * fhe.latency_s[0]:.0f} ms end to end)")
    right.table(ui.results_table(results, info).drop(columns="image").set_index("mode"))  # static: cheap to draw
    right.caption(ui.sizes_text(results))
    w = fhe.wire
    with st.container(border=True):
        st.markdown(f"**What crossed the wire** (to {w['endpoint']}): sent {w['sent_bytes']:,} bytes of ciphertext, "
                    f"received {w['received_bytes']:,} bytes of encrypted result"
                    + (f"; evaluation keys uploaded {w['key_uploads']} time(s) for this request" if w["key_uploads"] else "")
                    + ".")
        st.code(f"ciphertext  {w['ciphertext_hex']} …\nresult      {w['result_hex']} …", language=None)
        st.caption("The server saw only these bytes and the evaluation keys; it cannot decrypt either.")
        if st.button("Decrypt the same result with another key", key="home_wrong_key"):
            try:
                with st.spinner("Generating a fresh, unrelated key pair…"):
                    st.session_state["home_wrong"] = (saved.hash, int(idx), ui.decrypt_with_fresh_key(saved, w["result"]))
            except Exception as exc:  # noqa: BLE001
                ui.fail(exc)
        wrong = st.session_state.get("home_wrong")
        if wrong and wrong[:2] == (saved.hash, int(idx)):
            a, b = st.columns(2)
            a.markdown("**With this session's key**")
            a.write({"logits": [round(float(v), 3) for v in fhe.logits[0]],
                     "prediction": ui.label_text(info, fhe.predictions[0])})
            b.markdown("**With a freshly generated wrong key**")
            b.write({"logits": [round(float(v), 3) for v in wrong[2]], "note": "noise: not the answer"})

st.markdown(
    "**Pages:** Train a model · Compile it to a circuit · Encrypted inference on a gallery in four "
    "modes · Upload your own image · Bit-width explorer · Benchmarks. "
    "Data: MedMNIST v2 (Yang et al., Scientific Data 2023), CC BY 4.0."
)
