"""A Streamlit app for tests/e2e/test_browser_apps.py: a button whose click updates the page (a
round trip over Streamlit's WebSocket) and a file upload (an HTTP PUT the page makes itself)."""

import hashlib

import streamlit as st

if "clicks" not in st.session_state:
    st.session_state.clicks = 0
if st.button("Add one"):
    st.session_state.clicks += 1
st.write(f"Clicks: {st.session_state.clicks}")

uploaded = st.file_uploader("A file to hash")
if uploaded is not None:
    data = uploaded.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    st.write(f"Received {uploaded.name}: {len(data)} bytes, sha256 {digest}")
