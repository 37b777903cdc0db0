"""DDS settings that let camera-sized frames through over best-effort subscriptions.

A raw 688x550 rgb8 frame is 1.1 MB. With Fast DDS's defaults it is larger than the
publisher's 512 KiB shared-memory segment, so it leaves as a burst of UDP fragments, and a
best-effort reader (the sensor-data QoS camera drivers and `detector_node` use) loses the
whole frame when one fragment is lost: on a busy machine most frames never arrive. The
profiles in config/ fix that per middleware: `fastdds_large_frames.xml` (a 16 MiB
shared-memory segment: no fragments between processes on one computer) and
`cyclonedds_large_frames.xml` (larger socket buffers).

`large_frame_env(environ)` says which variable to set for the selected middleware, and
nothing when the user already configured it (their own profile always wins).
`apply_large_frame_defaults()` sets it in this process before rclpy starts, so every
process of the package (detector_node, replay_node, demo, soak and their children) uses it,
and the launch files set it for everything they start. The *publisher's* Fast DDS setting
decides how a frame travels: a separate camera driver needs the same variable.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ..config import config_dir as find_config_dir

FASTDDS_PROFILE = "fastdds_large_frames.xml"
CYCLONEDDS_CONFIG = "cyclonedds_large_frames.xml"
# Any of these means the user chose Fast DDS transports themselves.
FASTDDS_USER_SETTINGS = ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE",
                         "FASTDDS_BUILTIN_TRANSPORTS")


def large_frame_env(environ: Mapping[str, str], config_dir: str | Path | None = None) -> dict[str, str]:
    """Variables to add to `environ` so that large frames arrive; {} when the middleware is
    neither Fast DDS nor Cyclone DDS, or when the user already configured it."""
    if config_dir is None:
        config_dir = find_config_dir()
    rmw = environ.get("RMW_IMPLEMENTATION", "") or "rmw_fastrtps_cpp"  # ROS 2's default middleware
    if rmw.startswith("rmw_fastrtps"):
        if any(environ.get(k) for k in FASTDDS_USER_SETTINGS):
            return {}
        return {"FASTDDS_DEFAULT_PROFILES_FILE": str(Path(config_dir) / FASTDDS_PROFILE)}
    if rmw == "rmw_cyclonedds_cpp":
        if environ.get("CYCLONEDDS_URI"):
            return {}
        return {"CYCLONEDDS_URI": (Path(config_dir) / CYCLONEDDS_CONFIG).as_uri()}
    return {}


def apply_large_frame_defaults() -> dict[str, str]:
    """Set large_frame_env() in os.environ (call before rclpy.init); returns what was set."""
    added = large_frame_env(os.environ)
    os.environ.update(added)
    return added


def describe(added: Mapping[str, str]) -> str:
    """One log line on the DDS transport settings in effect."""
    if added:
        return "DDS settings for camera-sized frames: " + ", ".join(f"{k}={v}" for k, v in added.items())
    own = [k for k in (*FASTDDS_USER_SETTINGS, "CYCLONEDDS_URI") if os.environ.get(k)]
    return ("DDS transport settings from the environment (" + ", ".join(own) + ")" if own
            else "DDS transport: the middleware's defaults")


def large_frame_launch_actions(config_dir: str | Path) -> list:
    """SetEnvironmentVariable actions with large_frame_env() for the package's launch files
    (`launch` is only importable where ROS 2 is installed, hence imported here)."""
    from launch.actions import SetEnvironmentVariable

    return [SetEnvironmentVariable(k, v) for k, v in large_frame_env(os.environ, config_dir).items()]


def image_qos(reliability: str, depth: int):
    """The image subscriptions' QoS: keep last `depth`, volatile, best_effort (the sensor-data
    profile, which matches reliable and best-effort publishers alike) or reliable."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=int(depth), durability=DurabilityPolicy.VOLATILE,
                      reliability=ReliabilityPolicy.BEST_EFFORT if reliability == "best_effort"
                      else ReliabilityPolicy.RELIABLE)


def output_qos():
    """The detector's outputs: reliable, volatile, keep last 5 (what RViz and rosbag expect)."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.VOLATILE)
