"""Home: what the system does, the state of model / circuit / keys, and a first encrypted prediction."""

import time

import streamlit as st

# Title and explanation first: the first paint needs nothing from ui (torch, the engine).
st.title("Encrypted medical image classification")
# Few elements, and plain Markdown: with a room full of visitors opening the page at once on a
# small machine, each element is work for every browser (a graphviz chart took about 4 s to
# render here; bordered boxes and metric cards each cost a browser about 0.1 s of CPU here).
st.markdown(
    "A hospital keeps its images private while still using a third party's model. **The client** "
    "(hospital) quantizes and encrypts an image with its own secret key; **the server** runs a "
    "quantization-aware neural network compiled to a TFHE circuit **directly on the ciphertext**; "
    "only the client can decrypt the prediction. The server never sees the image or the result.\n\n"
    "**Image** (stays at the hospital) → **client: quantize + encrypt** (the secret key stays here) → "
    "**server: FHE circuit** (ciphertext and evaluation keys only) → **client: decrypt** (only the "
    "secret key opens the result) → **prediction** (seen by the hospital only)"
)

from dashboard import circuits, page, service, sessions, tables  # noqa: E402
from engine.learn.data import dataset_info  # noqa: E402
from engine.learn.metrics import label_text  # noqa: E402
from engine.learn.data import gallery_split  # noqa: E402

saved = page.select_model()
if saved is None:
    st.stop()
cc = saved.config.compile
info = dataset_info(saved.dataset)
sessions.prepare_keys(saved)  # key generation starts now, in the background

m = saved.metrics
status_box = st.empty()  # drawn now, and again at the end of the run: after a click, it says what answered


def status_row(patience_s: float) -> None:
    remote = sessions.session_remote(saved, wait=False, patience_s=patience_s)
    shared = service.shared_keys(saved)
    keys = (f"generated; evaluation keys uploaded once ({remote.evaluation_key_bytes / 2**20:.1f} MiB), "
            "this session now holds only its secret keys" if remote is not None else
            "being made; until then the app's shared key set answers" + (f" ({shared.origin})" if shared else " (being made too)"))
    status_box.markdown(
        f"**Model** {saved.name} ({saved.dataset}, hidden {list(saved.config.model.hidden)}): validation accuracy "
        f"{100 * m['val']['accuracy']:.1f}%, test {100 * m['test']['accuracy']:.1f}% (float)  \n"
        f"**Learned from** {saved.sources_text()}  \n"
        f"**Server** {service.service_url()} ({service.service_origin()})  \n"
        f"**This session's keys** {keys}"
    )


status_row(0.5)


def start_progress(box) -> bool:
    """Draw the start-up step by step in ``box``; whether answers can come (the service hosts
    the circuit and one key set, shared or this session's own, is ready)."""
    steps = sessions.start_steps(saved)
    ready = steps[0][0] and steps[1][0] and (steps[2][0] or steps[3][0])
    if ready:
        box.caption(":material/check_circle: " + " · ".join(what for ok, what in steps if ok))
        return True
    done = sum(ok for ok, _ in steps)
    with box.container():
        st.progress(done / len(steps), text=f"Start-up: {done} of {len(steps)} steps done")
        st.markdown("  \n".join(f"{':material/check_circle:' if ok else ':material/pending:'} {what}" for ok, what in steps))
    return False


start_box = st.empty()
started = start_progress(start_box)

st.subheader("Try it: encrypted prediction on a sample image")
split, source = gallery_split(page.data_config(saved.dataset))
idx = st.number_input(f"Sample index ({source})", 0, len(split) - 1, 0, key="home_index")
img = split.images[int(idx)]
left, right = st.columns([1, 3])
left.image(img, caption=f"true: {label_text(info, split.targets[int(idx)])}",
           width=160, clamp=True)
if right.button("Encrypt and classify", icon=":material/lock:", type="primary", key="home_run"):
    try:
        # Static text, not st.spinner: with a room full of visitors on a small machine, every
        # animation frame in every open page costs the CPU that the encrypted runs need.
        working = right.empty()
        working.caption("Encrypting, sending the ciphertext to the server, decrypting the answer…")
        # This session's own keys if ready, else the app's shared key set: no wait for a key generation.
        p, which = circuits.encrypted_predictor(saved)
        st.session_state["home_result"] = (saved.hash, int(idx), p.run(img[None], ["fhe"]), which)
        working.empty()
    except Exception as exc:  # noqa: BLE001 - shown to the user, never a traceback
        page.fail(exc)
last = st.session_state.get("home_result")
if last and last[0] == saved.hash and last[1] == int(idx):
    _, _, results, which = last
    fhe = results["fhe"]
    conf = tables.confidence_text(saved, fhe.logits[0])
    right.success(f"Encrypted prediction: **{label_text(info, fhe.predictions[0])}** "
                  f"({1000 * fhe.latency_s[0]:.0f} ms end to end)" + (f" · {conf}" if conf else ""))
    right.markdown(tables.decision_text(saved, fhe.logits[0], info))
    right.caption(f"Encrypted and decrypted with {which}.")
    # Markdown rather than st.table / st.code: a fresh browser session would otherwise fetch and
    # compile about 2.4 MB of JavaScript (Arrow reader, syntax highlighter) before showing the answer.
    right.markdown(tables.results_table(results, info, guard=circuits.guard(saved)).drop(columns="image").set_index("mode").to_markdown())
    right.caption(tables.sizes_text(results))
    w = fhe.wire
    with st.container(border=True):
        st.markdown(f"**What crossed the wire** (to {w['endpoint']}): sent {w['sent_bytes']:,} bytes of ciphertext, "
                    f"received {w['received_bytes']:,} bytes of encrypted result"
                    + (f"; evaluation keys uploaded {w['key_uploads']} time(s) for this request" if w["key_uploads"] else "")
                    + ".")
        st.markdown(f"ciphertext `{w['ciphertext_hex']} …`  \nresult `{w['result_hex']} …`")
        st.caption("The server saw only these bytes and the evaluation keys; it cannot decrypt either.")
        if st.button("Decrypt the same result with another key", key="home_wrong_key"):
            try:
                with st.spinner("Generating a fresh, unrelated key pair…"):
                    st.session_state["home_wrong"] = (saved.hash, int(idx), circuits.decrypt_with_fresh_key(saved, w["result"]))
            except Exception as exc:  # noqa: BLE001
                page.fail(exc)
        wrong = st.session_state.get("home_wrong")
        if wrong and wrong[:2] == (saved.hash, int(idx)):
            a, b = st.columns(2)
            a.markdown("**With this session's key**")
            a.write({"logits": [round(float(v), 3) for v in fhe.logits[0]],
                     "prediction": label_text(info, fhe.predictions[0])})
            b.markdown("**With a freshly generated wrong key**")
            b.write({"logits": [round(float(v), 3) for v in wrong[2]], "note": "noise: not the answer"})

status_row(0.0)  # again: the keys may have come during this run

# While the start goes on, the steps above are redrawn every second, after the rest of the page
# is drawn: a click on the button interrupts this loop and is handled at once (a timed fragment
# could interrupt the page's own run, or swallow the click).
deadline = time.monotonic() + 600
while not started and time.monotonic() < deadline:
    time.sleep(1.0)
    started = start_progress(start_box)

st.markdown(
    "**Pages:** Train a model · Compile it to a circuit · Encrypted inference on a gallery in four "
    "modes · Upload your own image · Bit-width explorer · Benchmarks. "
    "Data: MedMNIST v2 (Yang et al., Scientific Data 2023), CC BY 4.0."
)
