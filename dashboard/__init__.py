"""The dashboard: its pages (views/), the Streamlit glue they share, and the client side of the service."""
