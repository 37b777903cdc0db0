"""Anomaly mask pixels -> 3-D points in the robot's frame, without ROS.

Frames and conventions
----------------------
* Pixel coordinates follow OpenCV and sensor_msgs/CameraInfo: (u, v) = (column, row), the
  centre of pixel (i, j) is at (i, j), so the principal point of a 640x480 camera is near
  (319.5, 239.5).
* Rays live in the camera's OPTICAL frame (REP 103 "_optical" suffix): z forward, x right,
  y down. `pixel_rays` gives them with z = 1, so a ray scaled by a depth value (distance
  along z) is the 3-D point.
* `Pose` places the optical frame in a target frame (base_link, odom, ...):
  p_target = R @ p_optical + t, which is what tf2's lookup_transform(target, optical_frame)
  returns. REP 103 target frames: x forward, y left, z up.

A camera mounted at height h on base_link, looking forward (along x) and pitched down by p
radians has the optical-frame pose

    Pose.from_xyz_rpy((x, y, h), (-pi/2 - p, 0, -pi/2))

(rpy with URDF / tf2's fixed-axis convention: R = Rz(yaw) Ry(pitch) Rx(roll)). With p = 0
this is the usual camera_link -> camera_optical_frame rotation (-pi/2, 0, -pi/2); optical z
then maps to +x, optical x to -y (right), optical y to -z (down).

Two ways to place a pixel in 3-D:

* `ground_points`: flat-ground assumption, the ray is intersected with the plane
  z = ground_z of the target frame. Rays at or above the horizon never meet the ground in
  front of the camera and are dropped.
* `depth_points`: an aligned depth image gives each pixel's distance along optical z.

Both drop points farther than `max_range` (Euclidean distance from the camera centre) and
return float32 (N, 3) arrays, (0, 3) when nothing is left. Everything is vectorised: the
caller samples the mask with `grid_pixels` first so that a large anomaly gives hundreds
of points, not a point per pixel.
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from scipy.spatial.transform import Rotation

# Distortion vector lengths OpenCV accepts (plumb_bob: 5, rational_polynomial: 8).
_DIST_LENGTHS = (4, 5, 8, 12, 14)
# cv2.undistortPoints' default (5 iterations) leaves errors of 0.1-0.5 px at the corners of
# a strong lens; iterate until the reprojection error is below 1e-6 px (about 1 ms for 4800).
_UNDISTORT_CRITERIA = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 30, 1e-6)
# A ray whose unit direction points down by less than this never meets the ground in front.
_HORIZON_EPS = 1e-9


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a, dtype=np.float64)  # a copy: the caller's array stays writable and unaliased
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class CameraModel:
    """Pinhole intrinsics (3x3 `k`), distortion coefficients `d` (OpenCV order, may be
    empty) and the image size they belong to."""

    k: np.ndarray
    d: np.ndarray
    width: int
    height: int

    def __post_init__(self):
        k = np.asarray(self.k, dtype=np.float64)
        if k.shape != (3, 3):
            raise ValueError(f"camera matrix k must be 3x3, got shape {k.shape}")
        d = np.asarray(self.d, dtype=np.float64).reshape(-1)
        width, height = int(self.width), int(self.height)
        if width <= 0 or height <= 0 or not np.any(k):
            raise ValueError(f"camera model has zero size or an all-zero k ({width}x{height} pixels, "
                             f"fx={k[0, 0]:g}, fy={k[1, 1]:g}): the CameraInfo is that of an uncalibrated camera")
        if not (np.isfinite(k).all() and np.isfinite(d).all()):
            raise ValueError("camera model has NaN or infinite intrinsics or distortion coefficients")
        if k[0, 0] <= 0 or k[1, 1] <= 0:
            raise ValueError(f"focal lengths must be positive, got fx={k[0, 0]:g}, fy={k[1, 1]:g}")
        if d.size and d.size not in _DIST_LENGTHS:
            raise ValueError(f"{d.size} distortion coefficients; OpenCV takes 0, 4, 5, 8, 12 or 14 "
                             "(plumb_bob has 5, rational_polynomial 8)")
        object.__setattr__(self, "k", _readonly(k))
        object.__setattr__(self, "d", _readonly(d))
        object.__setattr__(self, "width", width)
        object.__setattr__(self, "height", height)

    @classmethod
    def from_camera_info_arrays(cls, k: Sequence[float], d: Sequence[float], width: int,
                                height: int) -> CameraModel:
        """From CameraInfo's fields: `k` row-major 9 values, `d`, width, height."""
        k = np.asarray(k, dtype=np.float64).reshape(-1)
        if k.size != 9:
            raise ValueError(f"CameraInfo k must have 9 values, got {k.size}")
        return cls(k.reshape(3, 3), np.asarray(d, dtype=np.float64), width, height)

    @property
    def distorted(self) -> bool:
        return bool(np.any(self.d != 0.0))

    def scaled(self, width: int, height: int) -> CameraModel:
        """The model of this camera's image resized to width x height (cv2.resize, any
        interpolation). fx, cx scale with the width ratio, fy, cy with the height ratio;
        the principal point is scaled about the image corner (-0.5, -0.5), not the first
        pixel's centre, because resizing maps pixel edges onto pixel edges:
        cx' = (cx + 0.5) * sx - 0.5. Distortion coefficients are in normalised
        coordinates and stay as they are."""
        width, height = int(width), int(height)
        if width <= 0 or height <= 0:
            raise ValueError(f"cannot scale the camera model to {width}x{height} pixels")
        sx, sy = width / self.width, height / self.height
        k = self.k.copy()
        k[0, :] *= sx  # fx, skew, cx
        k[1, :] *= sy  # fy, cy
        k[0, 2] += 0.5 * sx - 0.5
        k[1, 2] += 0.5 * sy - 0.5
        return CameraModel(k, self.d, width, height)


@dataclass(frozen=True, eq=False)
class Pose:
    """The camera's optical frame in the target frame: p_target = rotation @ p_optical + translation."""

    rotation: np.ndarray
    translation: np.ndarray

    def __post_init__(self):
        r = np.asarray(self.rotation, dtype=np.float64)
        t = np.asarray(self.translation, dtype=np.float64).reshape(-1)
        if r.shape != (3, 3) or t.shape != (3,):
            raise ValueError(f"pose needs a 3x3 rotation and a 3-vector translation, got {r.shape} and {t.shape}")
        if not (np.isfinite(r).all() and np.isfinite(t).all()):
            raise ValueError("pose has NaN or infinite values")
        if not np.allclose(r @ r.T, np.eye(3), atol=1e-6) or np.linalg.det(r) < 0:
            raise ValueError("pose rotation is not a proper rotation matrix (R R^T != I or det < 0)")
        object.__setattr__(self, "rotation", _readonly(r))
        object.__setattr__(self, "translation", _readonly(t))

    @classmethod
    def from_xyz_rpy(cls, xyz: Sequence[float], rpy: Sequence[float]) -> Pose:
        """URDF / tf2 fixed-axis roll, pitch, yaw (radians): R = Rz(yaw) Ry(pitch) Rx(roll)."""
        return cls(Rotation.from_euler("xyz", np.asarray(rpy, dtype=np.float64)).as_matrix(), xyz)

    @classmethod
    def from_xyz_quaternion(cls, xyz: Sequence[float], xyzw: Sequence[float]) -> Pose:
        """A tf2 TransformStamped's translation and rotation (x, y, z, w); normalised here."""
        q = np.asarray(xyzw, dtype=np.float64)
        if q.shape != (4,) or not np.isfinite(q).all() or np.linalg.norm(q) < 1e-12:
            raise ValueError(f"quaternion must be 4 finite values (x, y, z, w), not all zero; got {q.tolist()}")
        return cls(Rotation.from_quat(q).as_matrix(), xyz)


def grid_pixels(mask: np.ndarray, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """(u, v) float64 pixel centres of the True pixels of `mask` among those on a regular
    grid with `stride` pixels between samples, the grid centred in its stride x stride cells
    (offset stride // 2). Row-major order. A blob narrower than `stride` may fall between
    samples; stride 1 takes every pixel."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    stride = int(stride)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    off = stride // 2
    rows, cols = np.nonzero(mask[off::stride, off::stride])
    return (cols * stride + off).astype(np.float64), (rows * stride + off).astype(np.float64)


def _pixels(u: Any, v: Any) -> tuple[np.ndarray, np.ndarray]:
    u = np.asarray(u, dtype=np.float64).reshape(-1)
    v = np.asarray(v, dtype=np.float64).reshape(-1)
    if u.shape != v.shape:
        raise ValueError(f"u and v must have the same length, got {u.size} and {v.size}")
    return u, v


def pixel_rays(camera: CameraModel, u: Any, v: Any) -> np.ndarray:
    """(N, 3) float64 rays through pixels (u, v) in the optical frame, z = 1. Lens
    distortion is removed (cv2.undistortPoints) when any coefficient is non-zero."""
    u, v = _pixels(u, v)
    rays = np.ones((u.size, 3))
    if u.size == 0:
        return rays
    if camera.distorted:
        pts = np.stack([u, v], axis=1).reshape(-1, 1, 2)
        rays[:, :2] = cv2.undistortPoints(pts, camera.k, camera.d, None, None, None,
                                          _UNDISTORT_CRITERIA).reshape(-1, 2)
    else:
        (fx, s, cx), (_, fy, cy) = camera.k[0], camera.k[1]
        rays[:, 1] = (v - cy) / fy
        rays[:, 0] = (u - cx - s * rays[:, 1]) / fx
    return rays


def _check_range(max_range: float) -> float:
    max_range = float(max_range)
    if not max_range > 0:  # also refuses NaN
        raise ValueError(f"max_range must be > 0 metres, got {max_range}")
    return max_range


def ground_points(camera: CameraModel, pose: Pose, u: Any, v: Any, max_range: float,
                  ground_z: float = 0.0) -> np.ndarray:
    """(N', 3) float32 points where the pixels' rays meet the plane z = ground_z of the
    target frame. Dropped: rays at or above the horizon, intersections behind the camera
    (a camera below the plane) and points more than `max_range` from the camera centre."""
    max_range = _check_range(max_range)
    dirs = pixel_rays(camera, u, v) @ pose.rotation.T  # ray directions in the target frame
    norms = np.linalg.norm(dirs, axis=1)
    origin = pose.translation
    with np.errstate(divide="ignore", invalid="ignore"):
        s = (float(ground_z) - origin[2]) / dirs[:, 2]
    keep = (dirs[:, 2] < -_HORIZON_EPS * norms) & (s > 0) & (s * norms <= max_range)
    return (origin + s[keep, None] * dirs[keep]).astype(np.float32).reshape(-1, 3)


def depth_points(camera: CameraModel, pose: Pose, u: Any, v: Any, depth_m: np.ndarray,
                 max_range: float) -> np.ndarray:
    """(N', 3) float32 points of pixels (u, v) back-projected with the aligned depth image
    `depth_m` (H, W) metres along optical z (see `depth_to_metres`). A depth image of another
    resolution than `camera` (e.g. a full-size depth image for a downscaled mask) is sampled
    at the nearest pixel to the same image position, using the same pixel-edge alignment as
    `CameraModel.scaled`. Invalid depth (0, negative, NaN, inf) and points more than
    `max_range` from the camera centre are dropped."""
    max_range = _check_range(max_range)
    u, v = _pixels(u, v)
    depth_m = np.asarray(depth_m)
    if depth_m.ndim != 2:
        raise ValueError(f"depth image must be 2-D (H, W), got shape {depth_m.shape}")
    dh, dw = depth_m.shape
    # the depth pixel holding the same image position (at equal sizes, the pixel itself)
    col = np.floor((u + 0.5) * (dw / camera.width)).astype(np.intp)
    row = np.floor((v + 0.5) * (dh / camera.height)).astype(np.intp)
    inside = (col >= 0) & (col < dw) & (row >= 0) & (row < dh)
    z = np.full(u.size, np.nan)
    z[inside] = depth_m[row[inside], col[inside]]
    rays = pixel_rays(camera, u, v)
    with np.errstate(invalid="ignore"):
        keep = np.isfinite(z) & (z > 0)
        keep &= z * np.linalg.norm(rays, axis=1) <= max_range
    optical = rays[keep] * z[keep, None]
    return (optical @ pose.rotation.T + pose.translation).astype(np.float32).reshape(-1, 3)


def depth_to_metres(array: np.ndarray, encoding: str) -> np.ndarray:
    """A depth image's pixels -> float32 metres, invalid as NaN (REP 118). "16UC1": uint16
    millimetres, 0 = no reading; "32FC1": float metres, NaN / inf / <= 0 = no reading."""
    array = np.asarray(array)
    if encoding == "16UC1":
        if array.dtype.kind != "u" or array.dtype.itemsize != 2:
            raise ValueError(f"16UC1 depth needs uint16 millimetres, got {array.dtype.name}")
        out = array.astype(np.float32) / np.float32(1000.0)
        out[array == 0] = np.nan
        return out
    if encoding == "32FC1":
        if array.dtype.kind != "f":
            raise ValueError(f"32FC1 depth needs float metres, got {array.dtype.name}")
        out = array.astype(np.float32)  # always a copy: the caller's array is not modified
        with np.errstate(invalid="ignore"):
            out[~np.isfinite(out) | (out <= 0)] = np.nan
        return out
    raise ValueError(f"unsupported depth encoding {encoding!r}; supported: 16UC1 (uint16 millimetres), "
                     "32FC1 (float metres)")


class StampPairing:
    """The last `capacity` (stamp seconds, item) pairs, e.g. depth frames, matched to another
    stream's stamps. Thread-safe: one thread adds, another matches."""

    def __init__(self, capacity: int = 10):
        if int(capacity) < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._items: deque[tuple[float, Any]] = deque(maxlen=int(capacity))
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def add(self, stamp: float, item: Any) -> None:
        with self._lock:
            self._items.append((float(stamp), item))

    def match(self, stamp: float, tolerance: float) -> Any | None:
        """The buffered item with the stamp nearest to `stamp` (the earlier-added one on a tie)
        when within `tolerance` seconds (inclusive), else None. The item stays buffered."""
        stamp = float(stamp)
        with self._lock:
            best = min(self._items, key=lambda pair: abs(pair[0] - stamp), default=None)
        if best is None or abs(best[0] - stamp) > tolerance:
            return None
        return best[1]
