"""Measurement: the four modes, evaluation, benchmarks, sweeps, stability, validation."""
