"""ros.pointcloud: PointCloud2 packing and reading, CameraInfo and depth Image conversion (messages only, no DDS)."""
from __future__ import annotations

import array
import math

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField
from std_msgs.msg import Header

from ros_anomaly_diffusion.ros import pointcloud as pc
from ros_anomaly_diffusion.ros.image_codec import FrameError

POINTS = np.random.default_rng(5).normal(size=(57, 3)).astype(np.float32) * 10


def test_cloud_round_trip_and_layout():
    header = Header(stamp=Time(sec=1712345678, nanosec=123456789), frame_id="base_link")
    msg = pc.points_to_cloud(POINTS, header)
    assert isinstance(msg, PointCloud2)
    assert [(f.name, f.offset, f.datatype, f.count) for f in msg.fields] == \
        [("x", 0, PointField.FLOAT32, 1), ("y", 4, PointField.FLOAT32, 1), ("z", 8, PointField.FLOAT32, 1)]
    assert (msg.height, msg.width, msg.point_step, msg.row_step) == (1, 57, 12, 12 * 57)
    assert msg.is_dense and not msg.is_bigendian
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec, msg.header.frame_id) == \
        (1712345678, 123456789, "base_link")
    assert bytes(msg.data) == POINTS.astype("<f4").tobytes()
    back = pc.cloud_to_points(msg)
    assert back.dtype == np.float32 and back.shape == (57, 3)
    np.testing.assert_array_equal(back, POINTS)


def test_cloud_serialises_as_a_valid_message():
    from rclpy.serialization import deserialize_message, serialize_message

    msg = pc.points_to_cloud(POINTS, Header(frame_id="odom"))
    again = deserialize_message(serialize_message(msg), PointCloud2)
    np.testing.assert_array_equal(pc.cloud_to_points(again), POINTS)


def test_empty_cloud_round_trip():
    msg = pc.points_to_cloud(np.zeros((0, 3), np.float32), Header(frame_id="base_link"))
    assert (msg.width, msg.row_step, len(msg.data)) == (0, 0, 0)
    assert pc.cloud_to_points(msg).shape == (0, 3)


def test_points_to_cloud_refuses_other_shapes():
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        pc.points_to_cloud(np.zeros((4, 2), np.float32), Header())


def _foreign_cloud(points: np.ndarray, layout: dict[str, int], point_step: int, bigendian: bool = False,
                   height: int = 1, row_pad: int = 0) -> PointCloud2:
    """A cloud as another publisher might send it: fields at `layout` offsets, an intensity of -7,
    junk (0xAB) in unused bytes and `row_pad` bytes after each row."""
    order = ">" if bigendian else "<"
    n = len(points)
    width = n // height
    rec = np.full((n, point_step), 0xAB, np.uint8)
    for i, name in enumerate("xyz"):
        rec[:, layout[name]:layout[name] + 4] = points[:, i].astype(order + "f4").view(np.uint8).reshape(n, 4)
    rec[:, layout["intensity"]:layout["intensity"] + 4] = np.full(n, -7.0, order + "f4").view(np.uint8).reshape(n, 4)
    rows = np.concatenate([rec.reshape(height, width * point_step), np.full((height, row_pad), 0xCD, np.uint8)], 1)
    msg = PointCloud2()
    msg.height, msg.width = height, width
    msg.fields = [PointField(name=name, offset=off, datatype=PointField.FLOAT32, count=1)
                  for name, off in layout.items()]
    msg.is_bigendian, msg.point_step, msg.row_step = bigendian, point_step, width * point_step + row_pad
    msg.is_dense = True
    msg.data = array.array("B", rows.tobytes())
    return msg


def test_cloud_with_an_intensity_field_point_step_16():
    msg = _foreign_cloud(POINTS, {"x": 0, "y": 4, "z": 8, "intensity": 12}, 16)
    np.testing.assert_array_equal(pc.cloud_to_points(msg), POINTS)


@pytest.mark.parametrize("bigendian", [False, True])
def test_cloud_with_reordered_fields_padding_and_rows(bigendian):
    pts = POINTS[:56]
    msg = _foreign_cloud(pts, {"intensity": 0, "z": 4, "x": 12, "y": 20}, 32, bigendian=bigendian,
                         height=7, row_pad=5)
    np.testing.assert_array_equal(pc.cloud_to_points(msg), pts)


def test_cloud_errors_name_the_problem():
    msg = pc.points_to_cloud(POINTS, Header())
    no_z = pc.points_to_cloud(POINTS, Header())
    no_z.fields = list(no_z.fields[:2])
    with pytest.raises(ValueError, match="no z field"):
        pc.cloud_to_points(no_z)
    short = pc.points_to_cloud(POINTS, Header())
    short.data = array.array("B", bytes(msg.data)[:-1])
    with pytest.raises(ValueError, match="fewer than"):
        pc.cloud_to_points(short)
    ints = pc.points_to_cloud(POINTS, Header())
    ints.fields[0].datatype = PointField.INT32
    with pytest.raises(ValueError, match="field x has datatype"):
        pc.cloud_to_points(ints)


# --------------------------------------------------------------------------- CameraInfo


def _info(**kw) -> CameraInfo:
    info = CameraInfo(width=640, height=480, distortion_model="plumb_bob",
                      k=[500.0, 0.0, 319.5, 0.0, 505.0, 239.5, 0.0, 0.0, 1.0], d=[-0.1, 0.01, 0.0, 0.0, 0.0])
    for key, value in kw.items():
        setattr(info, key, value)
    return info


def test_camera_model_from_camera_info():
    cam = pc.camera_model(_info())
    np.testing.assert_array_equal(cam.k, [[500.0, 0.0, 319.5], [0.0, 505.0, 239.5], [0.0, 0.0, 1.0]])
    np.testing.assert_array_equal(cam.d, [-0.1, 0.01, 0.0, 0.0, 0.0])
    assert (cam.width, cam.height) == (640, 480)
    assert pc.camera_model(_info(distortion_model="rational_polynomial", d=[0.1] * 8)).d.size == 8
    # an unknown model with all-zero coefficients is a pinhole camera: accepted
    assert not pc.camera_model(_info(distortion_model="equidistant", d=[0.0] * 4)).distorted


def test_camera_model_refusals():
    with pytest.raises(ValueError, match="uncalibrated"):
        pc.camera_model(CameraInfo())
    with pytest.raises(ValueError, match="'equidistant' is not supported"):
        pc.camera_model(_info(distortion_model="equidistant", d=[0.1, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="binning"):
        pc.camera_model(_info(binning_x=2))
    info = _info()
    info.roi.x_offset, info.roi.width, info.roi.height = 10, 320, 240
    with pytest.raises(ValueError, match="region of interest"):
        pc.camera_model(info)
    full = _info()
    full.roi.width, full.roi.height = 640, 480  # an ROI covering the whole image is no ROI
    assert pc.camera_model(full).width == 640


# --------------------------------------------------------------------------- depth images


def _depth_msg(encoding: str, pixels: np.ndarray, pad: int = 0, bigendian: bool = False) -> Image:
    h, w = pixels.shape
    dt = pixels.dtype.newbyteorder(">" if bigendian else "<")
    rows = np.ascontiguousarray(pixels, dtype=dt).reshape(h, -1).view(np.uint8)
    rows = np.concatenate([rows, np.full((h, pad), 0xAB, np.uint8)], axis=1)
    msg = Image(height=h, width=w, encoding=encoding, is_bigendian=int(bigendian), step=rows.shape[1])
    msg.data = array.array("B", rows.tobytes())
    return msg


@pytest.mark.parametrize("bigendian", [False, True])
def test_16uc1_depth_with_row_padding(bigendian):
    mm = np.array([[1500, 0, 250], [65535, 1, 3000]], np.uint16)
    msg = _depth_msg("16UC1", mm, pad=6, bigendian=bigendian)
    assert msg.step > msg.width * 2
    m = pc.depth_image_to_metres(msg)
    assert m.shape == (2, 3) and m.dtype == np.float32
    np.testing.assert_allclose(m[~np.isnan(m)], [1.5, 0.25, 65.535, 0.001, 3.0], rtol=1e-6)
    assert math.isnan(m[0, 1]) and np.isnan(m).sum() == 1


def test_32fc1_depth_with_row_padding():
    metres = np.array([[2.5, np.nan, 0.0], [np.inf, 7.25, 0.5]], np.float32)
    m = pc.depth_image_to_metres(_depth_msg("32FC1", metres, pad=4, bigendian=True))
    np.testing.assert_array_equal(np.isnan(m), [[False, True, True], [True, False, False]])
    np.testing.assert_array_equal(m[~np.isnan(m)], [2.5, 7.25, 0.5])


def test_depth_image_errors():
    with pytest.raises(FrameError, match="'rgb8'.*16UC1.*32FC1"):
        pc.depth_image_to_metres(Image(height=1, width=1, encoding="rgb8", step=3, data=[0, 0, 0]))
    short = _depth_msg("16UC1", np.ones((4, 4), np.uint16))
    short.data = short.data[:-1]
    with pytest.raises(FrameError, match="fewer than height"):
        pc.depth_image_to_metres(short)
    narrow = _depth_msg("16UC1", np.ones((4, 4), np.uint16))
    narrow.step = 7
    with pytest.raises(FrameError, match="step 7"):
        pc.depth_image_to_metres(narrow)
    with pytest.raises(FrameError, match="zero size"):
        pc.depth_image_to_metres(Image(encoding="32FC1"))
