"""Encrypted MedMNIST classification: four wings (learn, fhe, serve, study) over config, and the CLI (python -m engine)."""
