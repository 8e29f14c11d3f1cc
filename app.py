"""The dashboard's entry point: page navigation, grouped by what a visitor wants to do.

``streamlit run app.py``. Each page is a thin script over the engine and the ``dashboard``
package (``dashboard/views/``). No ``pages/`` folder beside this script: Streamlit lists one by
itself in the first paint, before this script's navigation replaces it, and a visitor who
clicked in that list kept it. The navigation is declared before anything heavy is imported (the
pages load torch and the engine), so the first paint already shows it.
"""

from pathlib import Path

import streamlit as st

# dashboard.page.FAVICON, without importing it here (see above)
st.set_page_config(page_title="Encrypted MedMNIST", page_icon=str(Path(__file__).resolve().parent / "assets" / "favicon.png"),
                   layout="wide")

PAGES = {
    "Try it": [
        st.Page("dashboard/views/0_Home.py", title="Home", icon=":material/home:", default=True),
        st.Page("dashboard/views/4_Upload.py", url_path="Upload", title="Upload", icon=":material/upload_file:"),
        st.Page("dashboard/views/3_Encrypted_inference.py", url_path="Encrypted_inference", title="Encrypted inference", icon=":material/lock:"),
        st.Page("dashboard/views/7_Validate.py", url_path="Validate", title="Validate", icon=":material/fact_check:"),
    ],
    "Build": [
        st.Page("dashboard/views/1_Train.py", url_path="Train", title="Train", icon=":material/model_training:"),
        st.Page("dashboard/views/2_Compile.py", url_path="Compile", title="Compile", icon=":material/memory:"),
    ],
    "Measure": [
        st.Page("dashboard/views/5_Bit-width_explorer.py", url_path="Bit-width_explorer", title="Bit-width explorer", icon=":material/tune:"),
        st.Page("dashboard/views/6_Benchmarks.py", url_path="Benchmarks", title="Benchmarks", icon=":material/speed:"),
    ],
}

nav = st.navigation(PAGES)
from dashboard import service  # noqa: E402 - light: the service starts while the page imports torch and the engine

service.start()
nav.run()
