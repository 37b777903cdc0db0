"""Orchestration above the core's Detector: train and calibrate, evaluate, benchmark.
ROS-free like the core; unlike it, it reads the package's parameter files (config.py)."""
