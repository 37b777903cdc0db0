"""Variant families, one module each (scorer, build, fit, checkpoint layout), plus what
they share: fitting.py (training loop) and feature_space.py (the feature families' data)."""
