"""Anomaly points for the navigation stack: the detector's mask -> sensor_msgs/PointCloud2 in the
robot's frame (core/geometry.py does the geometry; this module feeds it messages).

- Intrinsics: the newest sensor_msgs/CameraInfo (scaled to the mask, which may be downscaled).
- Camera pose: tf2 (`lookup_transform(target_frame, optical frame, stamp)`) when tf2_ros is
  importable (a robot), otherwise static extrinsics: camera_xyz and camera_rpy of the OPTICAL
  frame in target_frame, the numbers `ros2 run tf2_ros tf2_echo <target> <optical>` prints.
  pose_source picks: auto (tf2 if importable, else static), tf or static.
- Without depth every sampled anomalous pixel is projected onto the ground plane z = ground_z
  of target_frame (pixels at or above the horizon and points beyond max_range dropped); with a
  depth topic the depth frame nearest in stamp (within depth_tolerance s) back-projects them,
  and a frame without such a depth frame gives no points (counted, not guessed).
- The mask is sampled every point_stride pixels, so a large anomaly is hundreds of points.

Frames that cannot be projected (no CameraInfo yet, no transform, no matching depth, a bad
CameraInfo or depth image) publish nothing; the reason is counted and logged (throttled).
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, fields

import numpy as np

from ..core import geometry
from ..core.stream_stats import milliseconds
from .pointcloud import camera_model, depth_image_to_metres, points_to_cloud

POSE_SOURCES = ("auto", "tf", "static")


@dataclass(frozen=True)
class PointsConfig:
    target_frame: str = "base_link"
    max_range: float = 20.0
    point_stride: int = 8
    ground_z: float = 0.0
    depth_tolerance: float = 0.05
    camera_xyz: tuple[float, float, float] = (0.0, 0.0, 1.0)
    camera_rpy: tuple[float, float, float] = (-np.pi / 2, 0.0, -np.pi / 2)  # level, looking along +x


# the node parameters that make a PointsConfig (target_frame read-only, the others live: a change
# applies from the next frame)
CONFIG_PARAMETERS = tuple(f.name for f in fields(PointsConfig))
SKIP_REASONS = ("no_camera_info", "camera", "transform", "no_depth", "depth")


def points_config(node_params: dict) -> PointsConfig:
    """The PointsConfig of the node's parameter values."""
    defaults = PointsConfig()
    return PointsConfig(**{k: tuple(node_params[k]) if isinstance(getattr(defaults, k), tuple) else node_params[k]
                           for k in CONFIG_PARAMETERS})  # ROS arrays arrive as lists


def points_values(points: list["AnomalyPoints"]) -> dict[str, str]:
    """/diagnostics figures of the cameras' projections since the last call: pose source,
    projection time p50 and frames without points per reason."""
    times = [t for p in points for t in p.take_times()]
    return {"points_pose_source": points[0].pose_source,
            "points_p50_ms": milliseconds(float(np.median(times)) if times else None),
            **{f"points_skipped_{k}": str(sum(p.skipped.get(k, 0) for p in points)) for k in SKIP_REASONS}}


def make_points(node, node_params: dict, cameras: int) -> list["AnomalyPoints"]:
    """One AnomalyPoints per camera of `node`, sharing one tf2 listener (pose_source auto or tf
    where tf2_ros imports); ValueError for pose_source tf without tf2_ros."""
    source = node_params["pose_source"]
    if source == "tf" and not tf_available():
        raise ValueError("pose_source is 'tf' but tf2_ros cannot be imported (source your ROS 2 setup); "
                         "use pose_source:=static with camera_xyz / camera_rpy")
    tf = TfPoses(node, node_params["target_frame"]) if source != "static" and tf_available() else None
    return [AnomalyPoints(points_config(node_params), tf, depth=bool(node_params["depth_topic"]))
            for _ in range(cameras)]


def stamp_seconds(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


class TfPoses:
    """Camera poses from tf2 (only where tf2_ros exists: a robot). `pose(source, stamp)` raises
    LookupError with tf2's reason when the transform is unavailable."""

    def __init__(self, node, target_frame: str, timeout_s: float = 0.05):
        import tf2_ros
        from rclpy.duration import Duration
        from rclpy.time import Time

        self._time, self._timeout = Time, Duration(seconds=timeout_s)
        self._buffer = tf2_ros.Buffer()
        self._listener = tf2_ros.TransformListener(self._buffer, node)
        self._errors = (tf2_ros.LookupException, tf2_ros.ConnectivityException, tf2_ros.ExtrapolationException)
        self.target_frame = target_frame

    def pose(self, source_frame: str, stamp) -> geometry.Pose:
        try:
            t = self._buffer.lookup_transform(self.target_frame, source_frame, self._time.from_msg(stamp),
                                              self._timeout).transform
        except self._errors as err:
            raise LookupError(f"no transform {self.target_frame} <- {source_frame}: {err}") from None
        return geometry.Pose.from_xyz_quaternion((t.translation.x, t.translation.y, t.translation.z),
                                                 (t.rotation.x, t.rotation.y, t.rotation.z, t.rotation.w))


def tf_available() -> bool:
    try:
        import tf2_ros  # noqa: F401
    except ImportError:
        return False
    return True


class AnomalyPoints:
    """Thread-safe enough for the node: CameraInfo and depth arrive in the executor thread,
    `cloud()` runs in the worker. `tf`: a TfPoses, or None for the static extrinsics."""

    def __init__(self, config: PointsConfig, tf: TfPoses | None = None, depth: bool = False):
        self.config = config
        self.tf = tf
        self.depth = geometry.StampPairing() if depth else None
        self._info = None  # newest CameraInfo message (decoded per frame: it is cheap)
        self.skipped: Counter = Counter()
        self.times_ms: list[float] = []

    @property
    def pose_source(self) -> str:
        return "tf" if self.tf is not None else "static"

    def on_camera_info(self, msg) -> None:
        self._info = msg

    def on_depth(self, msg) -> None:
        self.depth.add(stamp_seconds(msg.header.stamp), msg)

    def _pose(self, frame_id: str, stamp) -> geometry.Pose:
        if self.tf is not None:
            return self.tf.pose(frame_id, stamp)
        c = self.config
        return geometry.Pose.from_xyz_rpy(c.camera_xyz, c.camera_rpy)

    def cloud(self, header, mask: np.ndarray):
        """PointCloud2 (stamp of `header`, frame target_frame) of the mask's sampled pixels, or
        (None, reason) when this frame cannot be projected; returns (cloud, None) otherwise."""
        t0 = time.perf_counter()
        info, c = self._info, self.config
        if info is None:
            return self._skip("no_camera_info", "no CameraInfo received yet")
        try:
            camera = camera_model(info).scaled(mask.shape[1], mask.shape[0])
            pose = self._pose(header.frame_id or info.header.frame_id, header.stamp)
        except (ValueError, LookupError) as err:
            return self._skip("camera" if isinstance(err, ValueError) else "transform", str(err))
        u, v = geometry.grid_pixels(mask, c.point_stride)
        if self.depth is None:
            pts = geometry.ground_points(camera, pose, u, v, c.max_range, c.ground_z)
        else:
            msg = self.depth.match(stamp_seconds(header.stamp), c.depth_tolerance)
            if msg is None:
                return self._skip("no_depth", f"no depth frame within {c.depth_tolerance} s of the image stamp")
            try:
                depth_m = depth_image_to_metres(msg)
            except ValueError as err:
                return self._skip("depth", str(err))
            pts = geometry.depth_points(camera, pose, u, v, depth_m, c.max_range)
        out = header.__class__(stamp=header.stamp, frame_id=c.target_frame)
        cloud = points_to_cloud(pts, out)
        self.times_ms.append((time.perf_counter() - t0) * 1000)
        return cloud, None

    def _skip(self, kind: str, reason: str):
        self.skipped[kind] += 1
        return None, f"{kind}: {reason}"

    def take_times(self) -> list[float]:
        times, self.times_ms = self.times_ms, []
        return times
