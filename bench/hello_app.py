"""Baseline for bench/dashboard_sessions.py: the same button and answer text, nothing else (what
Streamlit and the browser alone cost on this machine)."""

import streamlit as st
st.title("hello")
if st.button("Encrypt and classify"):
    st.success("Encrypted prediction: nothing")
