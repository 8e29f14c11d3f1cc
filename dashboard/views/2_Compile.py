"""Compile the selected model to a TFHE circuit (cached) and generate this session's keys."""

import streamlit as st

from dashboard import circuits, page
from engine.study.stability import STABLE

st.set_page_config(page_title="Compile", page_icon=page.FAVICON, layout="wide")
st.title("Compile to an FHE circuit")
st.markdown(
    "Compilation turns the quantized network into a TFHE circuit. Each hidden neuron becomes one "
    "programmable bootstrap (a table lookup on encrypted data), the dominant cost. Accumulators are "
    "rounded to *rounding threshold bits* before each lookup; *p_error* is the tolerated probability "
    "of an off-by-one lookup result, traded against speed. Circuits are cached on disk, keyed by "
    "model hash, settings and Concrete ML version."
)
saved = page.select_model()
if saved is None:
    st.stop()
cc = circuits.compile_settings(saved, st)

locked = page.read_only() and cc != saved.config.compile
if locked:
    st.info("Read-only demo: only the served compile settings can be shown here.")
if st.button("Compile", type="primary", key="compile_btn", disabled=locked):
    try:
        with st.spinner("Compiling (instant when cached)…"):
            compiled = circuits.compiled_circuit(saved, cc)
        st.session_state["compiled_report"] = compiled.report.to_dict()
    except Exception as exc:  # noqa: BLE001
        page.fail(exc)

rep = st.session_state.get("compiled_report")
if rep and rep["model_hash"] == saved.hash and rep["compile"]["rounding_threshold_bits"] == cc.rounding_threshold_bits \
        and rep["compile"]["p_error"] == cc.p_error:
    c = st.columns(4)
    c[0].metric("Max bit-width", rep["max_bit_width"], help="Widest integer in the circuit (accumulators)")
    c[1].metric("Programmable bootstraps", rep["pbs_count"])
    c[2].metric("Compile time", f"{rep['compile_s']:.2f} s")
    c[3].metric("Source", "cache" if rep["from_cache"] else "fresh compile")
    st.caption(f"Cache key {rep['cache_key']} · concrete-ml {rep['versions']['concrete-ml']}")
    try:
        stab = circuits.stability(saved, cc)
    except Exception as exc:  # noqa: BLE001 - no dataset here: say so, the rest of the page works
        stab = None
        st.caption(f"Stability not measured: {exc}")
    if stab is not None:
        st.metric("Stability", f"{100 * stab.agreement:.2f}%",
                  help=f"Repeated FHE simulations of {stab.images} validation images ({stab.runs} runs) give the same "
                       "prediction this often: how likely the same image gets the same encrypted answer twice.")
        if stab.stable:
            st.success(f"Stable: the same image gets the same answer (at least {100 * STABLE:g}% agreement).", icon=":material/check_circle:")
        else:
            st.warning(f"Unstable: repeated runs agree on only {100 * stab.agreement:.2f}% of validation images (under {100 * STABLE:g}%). "
                       "The same image can get different encrypted answers.", icon=":material/warning:")
            if st.button("Find the nearest stable setting", key="stability_btn", disabled=page.read_only()):
                try:
                    with st.spinner("Compiling safer settings and measuring them (a minute or two)…"):
                        st.session_state["stability_proposal"] = (saved.hash, cc, circuits.nearest_stable(saved, cc))
                except Exception as exc:  # noqa: BLE001
                    page.fail(exc)
            prop = st.session_state.get("stability_proposal")
            if prop and prop[0] == saved.hash and prop[1] == cc:
                if prop[2] is None:
                    st.error("No nearby setting is stable: retrain with wider margins (fewer bits, pooling, more epochs).")
                else:
                    pc = prop[2].compile
                    st.info(f"Nearest stable setting: rounding to **{pc.rounding_threshold_bits} bits**, p_error "
                            f"**{pc.p_error:g}** — {100 * prop[2].agreement:.2f}% agreement, "
                            f"{1000 * prop[2].latency_s:.0f} ms per encrypted image.", icon=":material/lightbulb:")
    if st.button("Generate this session's keys", key="keygen_btn"):
        try:
            from engine.fhe.keys import FHEClient

            client = FHEClient(circuits.compiled_circuit(saved, cc))  # a throwaway pair, to measure
            client.keygen()
            st.session_state["keygen"] = (client.keygen_s, len(client.evaluation_keys()))
            del client
        except Exception as exc:  # noqa: BLE001
            page.fail(exc)
    if "keygen" in st.session_state:
        ks, size = st.session_state["keygen"]
        k = st.columns(2)
        k[0].metric("Key generation", f"{ks:.2f} s")
        k[1].metric("Evaluation key size", f"{size / 2**20:.1f} MiB")
        st.caption("Secret keys stay with the client; the server receives only the evaluation keys. "
                   "Encrypted predictions use this session's own keys, uploaded once to the service.")
