"""The dashboard's entry point: page navigation, grouped by what a visitor wants to do.

``streamlit run app.py``. Each page is a thin script over the engine (``pages/``).
"""

import streamlit as st

import ui

st.set_page_config(page_title="Encrypted MedMNIST", page_icon=ui.FAVICON, layout="wide")

PAGES = {
    "Try it": [
        st.Page("pages/0_Home.py", title="Home", icon=":material/home:", default=True),
        st.Page("pages/4_Upload.py", url_path="Upload", title="Upload", icon=":material/upload_file:"),
        st.Page("pages/3_Encrypted_inference.py", url_path="Encrypted_inference", title="Encrypted inference", icon=":material/lock:"),
        st.Page("pages/7_Validate.py", url_path="Validate", title="Validate", icon=":material/fact_check:"),
    ],
    "Build": [
        st.Page("pages/1_Train.py", url_path="Train", title="Train", icon=":material/model_training:"),
        st.Page("pages/2_Compile.py", url_path="Compile", title="Compile", icon=":material/memory:"),
    ],
    "Measure": [
        st.Page("pages/5_Bit-width_explorer.py", url_path="Bit-width_explorer", title="Bit-width explorer", icon=":material/tune:"),
        st.Page("pages/6_Benchmarks.py", url_path="Benchmarks", title="Benchmarks", icon=":material/speed:"),
    ],
}

st.navigation(PAGES).run()
