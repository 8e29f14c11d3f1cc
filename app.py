"""The dashboard's entry point: page navigation, grouped by what a visitor wants to do.

``streamlit run app.py``. Each page is a thin script over the engine (``views/``). The folder is
not called ``pages/``: Streamlit lists a ``pages/`` folder by itself in the first paint, before
this script's navigation replaces it, and a visitor who clicked in that list kept it. The
navigation is declared before anything heavy is imported (``ui`` loads torch and the engine),
so the first paint already shows it.
"""

from pathlib import Path

import streamlit as st

# ui.FAVICON, without importing ui here (see above)
st.set_page_config(page_title="Encrypted MedMNIST", page_icon=str(Path(__file__).resolve().parent / "assets" / "favicon.png"),
                   layout="wide")

PAGES = {
    "Try it": [
        st.Page("views/0_Home.py", title="Home", icon=":material/home:", default=True),
        st.Page("views/4_Upload.py", url_path="Upload", title="Upload", icon=":material/upload_file:"),
        st.Page("views/3_Encrypted_inference.py", url_path="Encrypted_inference", title="Encrypted inference", icon=":material/lock:"),
        st.Page("views/7_Validate.py", url_path="Validate", title="Validate", icon=":material/fact_check:"),
    ],
    "Build": [
        st.Page("views/1_Train.py", url_path="Train", title="Train", icon=":material/model_training:"),
        st.Page("views/2_Compile.py", url_path="Compile", title="Compile", icon=":material/memory:"),
    ],
    "Measure": [
        st.Page("views/5_Bit-width_explorer.py", url_path="Bit-width_explorer", title="Bit-width explorer", icon=":material/tune:"),
        st.Page("views/6_Benchmarks.py", url_path="Benchmarks", title="Benchmarks", icon=":material/speed:"),
    ],
}

nav = st.navigation(PAGES)
import ui_service  # noqa: E402 - light: the service starts while the page imports torch and the engine

ui_service.start()
nav.run()
