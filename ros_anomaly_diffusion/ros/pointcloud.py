"""sensor_msgs PointCloud2 / CameraInfo / depth Image <-> core.geometry, without sensor_msgs_py.

sensor_msgs_py (point_cloud2) ships with ROS but not as a wheel, so clouds are packed and
read here with numpy: `points_to_cloud` writes x, y, z float32 (point_step 12, little-endian,
one row); `cloud_to_points` reads x, y, z from any cloud by the fields' offsets, so clouds
with extra fields (intensity, rgb, ...), padded points or rows, or big-endian data from
other publishers work too.
"""
from __future__ import annotations

import array
from typing import Any

import numpy as np
from sensor_msgs.msg import CameraInfo, PointCloud2, PointField

from ..core import geometry
from .image_codec import FrameError, bytes_of, image_pixels

# PointField datatype -> numpy type, for the x, y, z fields cloud_to_points reads
_FIELD_TYPES = {PointField.FLOAT32: np.float32, PointField.FLOAT64: np.float64}
# CameraInfo distortion models cv2.undistortPoints implements
_DISTORTION_MODELS = ("", "plumb_bob", "rational_polynomial")
DEPTH_ENCODINGS = ("16UC1", "32FC1")


def points_to_cloud(points: np.ndarray, header: Any) -> PointCloud2:
    """(N, 3) points -> PointCloud2 with x, y, z FLOAT32, dense, one row. `header` is
    attached as is (stamp of the image the points come from, frame_id the target frame)."""
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be (N, 3), got shape {points.shape}")
    data = np.ascontiguousarray(points, dtype="<f4")
    msg = PointCloud2()
    msg.header = header
    msg.height, msg.width = 1, int(data.shape[0])
    msg.fields = [PointField(name=name, offset=4 * i, datatype=PointField.FLOAT32, count=1)
                  for i, name in enumerate("xyz")]
    msg.is_bigendian = False
    msg.point_step = 12
    msg.row_step = 12 * msg.width
    msg.is_dense = True  # ground_points / depth_points drop every invalid point
    msg.data = array.array("B", data.tobytes())  # array.array: the setter's fast path
    return msg


def cloud_to_points(msg: Any) -> np.ndarray:
    """PointCloud2 -> (N, 3) float32 x, y, z (NaN points of a non-dense cloud kept)."""
    fields = {f.name: f for f in msg.fields}
    missing = [n for n in "xyz" if n not in fields]
    if missing:
        raise ValueError(f"PointCloud2 has no {', '.join(missing)} field(s); fields: {', '.join(fields) or 'none'}")
    order = ">" if msg.is_bigendian else "<"
    formats = []
    for n in "xyz":
        if fields[n].datatype not in _FIELD_TYPES:
            raise ValueError(f"PointCloud2 field {n} has datatype {fields[n].datatype}; "
                             f"FLOAT32 ({PointField.FLOAT32}) or FLOAT64 ({PointField.FLOAT64}) is supported")
        formats.append(np.dtype(_FIELD_TYPES[fields[n].datatype]).newbyteorder(order))
    height, width, step, row_step = int(msg.height), int(msg.width), int(msg.point_step), int(msg.row_step)
    offsets = [int(fields[n].offset) for n in "xyz"]
    if any(o < 0 or o + f.itemsize > step for o, f in zip(offsets, formats)):
        raise ValueError(f"PointCloud2 x, y, z offsets {offsets} do not fit in point_step {step}")
    if row_step < width * step:
        raise ValueError(f"PointCloud2 row_step {row_step} is smaller than width * point_step = {width * step}")
    buf = bytes_of(msg.data)
    if buf.size < height * row_step:
        raise ValueError(f"PointCloud2 data has {buf.size} bytes, fewer than height * row_step = "
                         f"{height} * {row_step} = {height * row_step}")
    if height * width == 0:
        return np.zeros((0, 3), np.float32)
    dtype = np.dtype({"names": list("xyz"), "formats": formats, "offsets": offsets, "itemsize": step})
    rows = np.ascontiguousarray(buf[: height * row_step].reshape(height, row_step)[:, : width * step])
    pts = rows.view(dtype).reshape(-1)
    return np.stack([pts["x"], pts["y"], pts["z"]], axis=1).astype(np.float32)


def camera_model(info: CameraInfo) -> geometry.CameraModel:
    """CameraInfo -> CameraModel (k, d, width, height). Refused with a ValueError: an
    uncalibrated camera (all zeros), a distortion model OpenCV's pinhole undistortion does
    not implement (e.g. equidistant) and binning or a region of interest, which would change
    the image's geometry from the calibrated one."""
    model = str(info.distortion_model)
    d = np.asarray(info.d, dtype=np.float64)
    if model not in _DISTORTION_MODELS and np.any(d != 0):
        raise ValueError(f"distortion model {model!r} is not supported; "
                         f"supported: {', '.join(m for m in _DISTORTION_MODELS if m)}")
    roi = info.roi
    if int(info.binning_x) > 1 or int(info.binning_y) > 1 or int(roi.x_offset) or int(roi.y_offset) \
            or (int(roi.width), int(roi.height)) not in ((0, 0), (int(info.width), int(info.height))):
        raise ValueError(f"CameraInfo with binning ({info.binning_x}, {info.binning_y}) or a region of interest "
                         f"({roi.x_offset}, {roi.y_offset}, {roi.width}x{roi.height}) is not supported; "
                         "publish the full-resolution CameraInfo")
    return geometry.CameraModel.from_camera_info_arrays(info.k, d, info.width, info.height)


def depth_image_to_metres(msg: Any) -> np.ndarray:
    """sensor_msgs/Image depth (16UC1 millimetres or 32FC1 metres; padded rows and either byte
    order) -> float32 (H, W) metres, invalid as NaN. Malformed messages raise FrameError
    (a ValueError) as image_codec does."""
    encoding = str(msg.encoding)
    if encoding not in DEPTH_ENCODINGS:
        raise FrameError(f"unsupported depth encoding {encoding!r}; supported: 16UC1 (uint16 millimetres), "
                         "32FC1 (float metres)", "encoding")
    pixels = image_pixels(msg, "depth image")[..., 0]
    return geometry.depth_to_metres(pixels, encoding)
