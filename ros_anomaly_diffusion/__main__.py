"""`python -m ros_anomaly_diffusion`: the `ros-anomaly-diffusion` console script."""
import sys

from .cli import main

sys.exit(main())
