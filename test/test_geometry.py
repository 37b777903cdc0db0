"""core.geometry: mask pixels -> 3-D points by hand-worked cases, OpenCV's own projection and a property."""
from __future__ import annotations

import math
import sys
import threading

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ros_anomaly_diffusion.core import geometry as g
from ros_anomaly_diffusion.core.geometry import CameraModel, Pose, StampPairing

W, H, F = 640, 480, 500.0
K = np.array([[F, 0.0, 320.0], [0.0, F, 240.0], [0.0, 0.0, 1.0]])  # principal point on a pixel centre
CAM = CameraModel(K, [], W, H)
PLUMB_BOB = [-0.3, 0.1, 0.001, -0.002, 0.02]
RATIONAL = [0.1, -0.05, 0.001, -0.001, 0.01, 0.3, -0.02, 0.02]


def mounted(h: float, pitch: float, x: float = 0.0, y: float = 0.0, yaw: float = 0.0) -> Pose:
    """Optical frame of a camera at height h looking along base_link's x rotated by yaw, pitched down by pitch."""
    return Pose.from_xyz_rpy((x, y, h), (-math.pi / 2 - pitch, 0.0, -math.pi / 2 + yaw))


# --------------------------------------------------------------------------- poses


def test_rpy_is_fixed_axis_roll_then_pitch_then_yaw():
    def rx(a):
        return np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])

    def ry(a):
        return np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])

    def rz(a):
        return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])

    r, p, y = 0.3, -0.7, 1.9
    np.testing.assert_allclose(Pose.from_xyz_rpy((0, 0, 0), (r, p, y)).rotation, rz(y) @ ry(p) @ rx(r), atol=1e-12)


def test_level_optical_frame_looks_forward_right_is_minus_y_down_is_minus_z():
    rot = mounted(1.0, 0.0).rotation
    np.testing.assert_allclose(rot @ [0, 0, 1], [1, 0, 0], atol=1e-12)  # optical z: forward
    np.testing.assert_allclose(rot @ [1, 0, 0], [0, -1, 0], atol=1e-12)  # optical x: right
    np.testing.assert_allclose(rot @ [0, 1, 0], [0, 0, -1], atol=1e-12)  # optical y: down


def test_quaternion_pose_matches_rpy_pose():
    # yaw of 90 degrees: base x -> y; the quaternion (x, y, z, w) written out by hand
    q = Pose.from_xyz_quaternion((1, 2, 3), (0, 0, math.sin(math.pi / 4), math.cos(math.pi / 4)))
    np.testing.assert_allclose(q.rotation @ [1, 0, 0], [0, 1, 0], atol=1e-12)
    np.testing.assert_allclose(q.translation, [1, 2, 3])
    # an unnormalised quaternion is normalised, as tf2 tolerates
    q2 = Pose.from_xyz_quaternion((0, 0, 0), (0, 0, 2 * math.sin(math.pi / 4), 2 * math.cos(math.pi / 4)))
    np.testing.assert_allclose(q2.rotation, q.rotation, atol=1e-12)
    with pytest.raises(ValueError, match="quaternion"):
        Pose.from_xyz_quaternion((0, 0, 0), (0, 0, 0, 0))


def test_pose_refuses_a_non_rotation():
    with pytest.raises(ValueError, match="rotation"):
        Pose(np.diag([1.0, 1.0, -1.0]), [0, 0, 0])
    with pytest.raises(ValueError, match="3x3"):
        Pose(np.eye(2), [0, 0, 0])


# --------------------------------------------------------------------------- camera model


def test_camera_model_validation_messages():
    with pytest.raises(ValueError, match="uncalibrated"):
        CameraModel.from_camera_info_arrays([0.0] * 9, [], 0, 0)
    with pytest.raises(ValueError, match="uncalibrated"):
        CameraModel.from_camera_info_arrays([0.0] * 9, [], 640, 480)
    with pytest.raises(ValueError, match="fx=-1"):
        CameraModel([[-1, 0, 320], [0, 500, 240], [0, 0, 1]], [], W, H)
    with pytest.raises(ValueError, match="fy=0"):
        CameraModel([[500, 0, 320], [0, 0, 240], [0, 0, 1]], [], W, H)
    with pytest.raises(ValueError, match="9 values"):
        CameraModel.from_camera_info_arrays([1.0] * 8, [], W, H)
    with pytest.raises(ValueError, match="3 distortion coefficients"):
        CameraModel(K, [0.1, 0.0, 0.0], W, H)


def test_camera_info_arrays_are_row_major_and_copied():
    k = K.reshape(-1).tolist()
    cam = CameraModel.from_camera_info_arrays(k, PLUMB_BOB, W, H)
    np.testing.assert_array_equal(cam.k, K)
    np.testing.assert_array_equal(cam.d, PLUMB_BOB)
    assert (cam.width, cam.height) == (W, H) and cam.distorted
    assert not cam.k.flags.writeable
    assert not CameraModel(K, [0.0] * 5, W, H).distorted


def test_scaled_halves_focal_lengths_and_keeps_the_pixel_edge_alignment_of_cv2_resize():
    half = CAM.scaled(W // 2, H // 4)
    assert (half.width, half.height) == (320, 120)
    assert half.k[0, 0] == pytest.approx(F / 2) and half.k[1, 1] == pytest.approx(F / 4)
    # cx = 320 is the centre of pixel 320, i.e. 320.5 px from the image's left edge; half of that
    # is 160.25 px from the edge, the point 159.75 in pixel-centre coordinates (and cy likewise).
    assert half.k[0, 2] == pytest.approx((320 + 0.5) / 2 - 0.5)
    assert half.k[1, 2] == pytest.approx((240 + 0.5) / 4 - 0.5)
    # what matters: a low-res pixel's ray is the ray of the full-res position cv2.resize samples for it
    u, v = np.array([0.0, 10.0, 319.0]), np.array([0.0, 70.0, 119.0])
    np.testing.assert_allclose(g.pixel_rays(half, u, v), g.pixel_rays(CAM, (u + 0.5) * 2 - 0.5, (v + 0.5) * 4 - 0.5),
                               atol=1e-12)
    back = half.scaled(W, H)
    np.testing.assert_allclose(back.k, CAM.k, atol=1e-12)
    with pytest.raises(ValueError, match="0x120"):
        CAM.scaled(0, 120)


def test_scaled_model_puts_a_downscaled_pixel_on_the_same_ground_point():
    """A full-resolution pixel and the downscaled mask's position of the same image point give the
    same ground point."""
    pose = mounted(1.0, 0.4)
    small = CAM.scaled(160, 120)
    full_pt = g.ground_points(CAM, pose, [320.0], [300.0], 100.0)
    small_pt = g.ground_points(small, pose, [(320 + 0.5) / 4 - 0.5], [(300 + 0.5) / 4 - 0.5], 100.0)
    np.testing.assert_allclose(small_pt, full_pt, rtol=1e-6)


# --------------------------------------------------------------------------- grid


def test_grid_pixels_counts_and_positions():
    u, v = g.grid_pixels(np.ones((480, 640), bool), 8)
    assert u.size == v.size == 60 * 80 and u.dtype == v.dtype == np.float64
    assert u.min() == 4 and u.max() == 636 and v.min() == 4 and v.max() == 476  # centred in 8x8 cells
    mask = np.zeros((40, 40), bool)
    mask[12, 4] = True
    mask[12, 5] = True  # off the grid: not sampled
    u, v = g.grid_pixels(mask, 8)
    assert u.tolist() == [4.0] and v.tolist() == [12.0]
    mask = np.random.default_rng(0).random((30, 50)) > 0.5
    rows, cols = np.nonzero(mask)
    u, v = g.grid_pixels(mask, 1)
    np.testing.assert_array_equal(u, cols)
    np.testing.assert_array_equal(v, rows)
    u2, v2 = g.grid_pixels(mask, 1)
    np.testing.assert_array_equal(u2, u)
    np.testing.assert_array_equal(v2, v)
    with pytest.raises(ValueError, match="stride"):
        g.grid_pixels(mask, 0)


def test_empty_mask_gives_empty_arrays_and_empty_point_sets():
    u, v = g.grid_pixels(np.zeros((480, 640), bool), 8)
    assert u.shape == v.shape == (0,)
    assert g.pixel_rays(CAM, u, v).shape == (0, 3)
    for pts in (g.ground_points(CAM, mounted(1.0, 0.3), u, v, 10.0),
                g.depth_points(CAM, mounted(1.0, 0.3), u, v, np.ones((H, W)), 10.0),
                g.ground_points(CameraModel(K, PLUMB_BOB, W, H), mounted(1.0, 0.3), u, v, 10.0)):
        assert pts.shape == (0, 3) and pts.dtype == np.float32


# --------------------------------------------------------------------------- ground plane


@pytest.mark.parametrize("h, pitch", [(1.0, 0.3), (0.45, 0.1), (2.5, 1.2)])
def test_principal_point_hits_ground_at_h_over_tan_pitch(h, pitch):
    pts = g.ground_points(CAM, mounted(h, pitch), [320.0], [240.0], 1000.0)
    assert pts.shape == (1, 3) and pts.dtype == np.float32
    x, y, z = pts[0].astype(np.float64)
    assert x == pytest.approx(h / math.tan(pitch), rel=1e-6)
    assert abs(y) < 1e-6 and abs(z) < 1e-6
    # the camera's mount position shifts the point and a ground plane at ground_z raises it
    shifted = g.ground_points(CAM, mounted(h + 0.2, pitch, x=0.3, y=-0.1), [320.0], [240.0], 1000.0,
                              ground_z=0.2)[0]
    np.testing.assert_allclose(shifted, [0.3 + h / math.tan(pitch), -0.1, 0.2], rtol=1e-6, atol=1e-6)


def test_horizon_row_and_above_give_no_point_below_gives_one():
    level = mounted(1.0, 0.0)
    assert g.ground_points(CAM, level, [320.0], [239.0], 1e6).shape == (0, 3)  # one row above the horizon
    assert g.ground_points(CAM, level, [320.0], [240.0], 1e6).shape == (0, 3)  # the horizon row itself
    assert g.ground_points(CAM, level, [320.0], [0.0], 1e6).shape == (0, 3)  # the sky
    # Rays that descend by less than 1e-9 per metre count as horizontal (their ground point would
    # be over 1e9 m away): dropped even with no range limit, whichever way rounding tips them.
    for pitch in (0.0, 1e-12, -1e-12):
        assert g.ground_points(CAM, mounted(1.0, pitch), [320.0], [240.0], math.inf).shape == (0, 3)
    below = g.ground_points(CAM, level, [320.0], [241.0], 1e6)
    # one row below: the ray drops 1/F per metre, so it meets the ground F metres ahead
    np.testing.assert_allclose(below, [[F, 0.0, 0.0]], rtol=1e-6, atol=1e-6)


def test_max_range_drops_far_points():
    level = mounted(1.0, 0.0)
    v = np.array([241.0, 250.0, 290.0])  # ground at 500, 50 and 10 m ahead
    dist = np.hypot(F / (v - 240), 1.0)  # from the camera centre, 1 m above the ground
    assert len(g.ground_points(CAM, level, [320.0] * 3, v, 1e6)) == 3
    pts = g.ground_points(CAM, level, [320.0] * 3, v, 60.0)
    np.testing.assert_allclose(pts[:, 0], [50.0, 10.0], rtol=1e-6)
    # the limit is Euclidean distance from the camera, inclusive
    assert len(g.ground_points(CAM, level, [320.0], [250.0], dist[1] * (1 + 1e-9))) == 1
    assert len(g.ground_points(CAM, level, [320.0], [250.0], dist[1] * (1 - 1e-6))) == 0
    with pytest.raises(ValueError, match="max_range"):
        g.ground_points(CAM, level, [320.0], [250.0], 0.0)


def test_pixel_left_of_principal_point_lands_left_positive_y():
    pose = mounted(1.0, 0.5)
    left, right = g.ground_points(CAM, pose, [100.0, 540.0], [300.0, 300.0], 100.0)
    assert left[1] > 0.1 and right[1] < -0.1
    assert left[1] == pytest.approx(-right[1], rel=1e-6)  # symmetric about the principal point


def test_camera_below_the_plane_gives_nothing():
    assert g.ground_points(CAM, mounted(1.0, 0.4), [320.0], [400.0], 100.0, ground_z=2.0).shape == (0, 3)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(h=st.floats(0.2, 3.0), pitch=st.floats(-0.3, 1.4), yaw=st.floats(-math.pi, math.pi),
       roll=st.floats(-0.3, 0.3), ground_z=st.floats(-0.5, 3.5), mount=st.tuples(st.floats(-2, 2), st.floats(-2, 2)),
       u=st.floats(0, W - 1), v=st.floats(0, H - 1), distorted=st.booleans())
def test_ground_points_lie_on_the_plane_and_on_the_pixels_ray(h, pitch, yaw, roll, ground_z, mount, u, v, distorted):
    pose = Pose.from_xyz_rpy((mount[0], mount[1], h), (-math.pi / 2 - pitch, roll, -math.pi / 2 + yaw))
    cam = CameraModel(K, PLUMB_BOB if distorted else [], W, H)
    pts = g.ground_points(cam, pose, [u], [v], math.inf, ground_z=ground_z).astype(np.float64)
    down = (pose.rotation @ g.pixel_rays(cam, [u], [v])[0])[2] / np.linalg.norm(g.pixel_rays(cam, [u], [v])[0])
    if ground_z >= h or down >= 0:
        assert len(pts) == 0  # camera under the plane, or a ray at or above the horizon: never a point
    elif down < -1e-6:
        assert len(pts) == 1  # below the horizon, no range limit: always (rays in between may go either way)
    if len(pts) == 0:
        return
    p = pts[0]
    # float32 output: relative precision ~1e-7 of the coordinates' size
    assert abs(p[2] - ground_z) <= 1e-6 * max(1.0, np.abs(p).max())
    # on the pixel's ray: in front of the camera, and OpenCV projects it back onto the pixel
    rot_cv = pose.rotation.T
    t_cv = -rot_cv @ pose.translation
    assert (rot_cv @ p + t_cv)[2] > 0
    pix, _ = cv2.projectPoints(p[None], cv2.Rodrigues(rot_cv)[0], t_cv, cam.k, cam.d)
    np.testing.assert_allclose(pix.reshape(2), [u, v], atol=1e-3)


# --------------------------------------------------------------------------- rays and distortion


@pytest.mark.parametrize("d", [PLUMB_BOB, RATIONAL], ids=["plumb_bob", "rational_polynomial"])
def test_undistortion_recovers_the_rays_opencv_projected(d):
    rng = np.random.default_rng(3)
    # rays over the whole image, corners included, where 5 OpenCV default iterations are not enough
    rays = np.c_[rng.uniform(-0.62, 0.62, 500), rng.uniform(-0.46, 0.46, 500), np.ones(500)]
    pix, _ = cv2.projectPoints(rays, np.zeros(3), np.zeros(3), K, np.asarray(d))
    pix = pix.reshape(-1, 2)
    cam = CameraModel(K, d, W, H)
    np.testing.assert_allclose(g.pixel_rays(cam, pix[:, 0], pix[:, 1]), rays, atol=1e-8)
    # the distorted pixels are not where a pinhole would put them: undistortion did something
    assert np.abs(g.pixel_rays(CAM, pix[:, 0], pix[:, 1]) - rays).max() > 1e-2


def test_pinhole_rays_with_skew_invert_k():
    k = np.array([[480.0, 3.0, 300.0], [0.0, 520.0, 250.0], [0.0, 0.0, 1.0]])
    rays = np.array([[0.1, -0.2, 1.0], [-0.4, 0.3, 1.0], [0.0, 0.0, 1.0]])
    pix = rays @ k.T
    np.testing.assert_allclose(g.pixel_rays(CameraModel(k, [], W, H), pix[:, 0], pix[:, 1]), rays, atol=1e-12)


# --------------------------------------------------------------------------- depth


def _project(cam: CameraModel, pose: Pose, points: np.ndarray):
    """Target-frame points -> (u, v, depth along optical z) by cv2.projectPoints with the inverse pose."""
    rot_cv = pose.rotation.T  # target -> optical
    t_cv = -rot_cv @ pose.translation
    pix, _ = cv2.projectPoints(points, cv2.Rodrigues(rot_cv)[0], t_cv, cam.k, cam.d)
    depth = (points @ rot_cv.T + t_cv)[:, 2]
    return pix[:, 0, 0], pix[:, 0, 1], depth


def _scene(n: int = 40) -> np.ndarray:
    """Points on and above the ground 3..12 m ahead, in the field of view (target frame)."""
    rng = np.random.default_rng(7)
    x = rng.uniform(3, 12, n)
    return np.c_[x, x * rng.uniform(-0.4, 0.4, n), rng.uniform(0, 1.0, n)]


@pytest.mark.parametrize("d", [[], PLUMB_BOB], ids=["pinhole", "plumb_bob"])
def test_depth_points_reproduce_known_points(d):
    cam = CameraModel(K, d, W, H)
    pose = mounted(1.3, 0.25, x=0.2, y=0.1, yaw=0.1)
    points = _scene()
    u, v, z = _project(cam, pose, points)
    assert ((u >= 0) & (u < W) & (v >= 0) & (v < H)).all() and (z > 0).all()
    depth = np.zeros((H, W), np.float32)
    col, row = np.floor(u + 0.5).astype(int), np.floor(v + 0.5).astype(int)
    assert len(set(zip(col, row))) == len(col)  # one point per depth pixel
    depth[row, col] = z
    got = g.depth_points(cam, pose, u, v, depth, 100.0)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, points, atol=2e-5 * 12)  # float32 depth of ~12 m


def test_depth_image_of_another_resolution_is_sampled_at_the_same_image_position():
    pose = mounted(1.3, 0.25)
    points = _scene()
    u, v, z = _project(CAM, pose, points)  # full-resolution pixels
    depth = np.zeros((H, W), np.float32)
    depth[np.floor(v + 0.5).astype(int), np.floor(u + 0.5).astype(int)] = z
    small = CAM.scaled(W // 4, H // 4)  # the node's downscaled mask
    su, sv = (u + 0.5) / 4 - 0.5, (v + 0.5) / 4 - 0.5
    np.testing.assert_allclose(g.depth_points(small, pose, su, sv, depth, 100.0), points, atol=2e-5 * 12)
    # and a depth image smaller than the mask: each mask pixel reads the depth pixel covering it
    coarse = np.zeros((H // 4, W // 4), np.float32)
    coarse[np.floor((v + 0.5) / 4).astype(int), np.floor((u + 0.5) / 4).astype(int)] = z
    np.testing.assert_allclose(g.depth_points(CAM, pose, u, v, coarse, 100.0), points, atol=2e-5 * 12)


def test_invalid_and_far_depth_is_dropped():
    pose = mounted(1.0, 0.0)
    depth = np.full((H, W), 5.0, np.float32)
    bad = {(10, 10): 0.0, (20, 10): np.nan, (30, 10): np.inf, (40, 10): -2.0, (50, 10): 80.0}
    for (col, row), value in bad.items():
        depth[row, col] = value
    u = np.array([c for c, _ in bad] + [60.0, 320.0])
    v = np.array([r for _, r in bad] + [10.0, 240.0])
    pts = g.depth_points(CAM, pose, u, v, depth, 50.0)
    assert len(pts) == 2
    np.testing.assert_allclose(pts[1], [5.0, 0.0, 1.0], atol=1e-6)  # principal point, 5 m ahead
    assert len(g.depth_points(CAM, pose, u, v, depth, 1e3)) == 3  # 80 m is kept with a longer range
    # pixels outside the depth image are dropped, not wrapped or clipped to the border
    assert g.depth_points(CAM, pose, [-3.0, W + 2.0], [5.0, 5.0], depth, 50.0).shape == (0, 3)


def test_depth_to_metres():
    mm = np.array([[1500, 0], [65535, 1]], np.uint16)
    m = g.depth_to_metres(mm, "16UC1")
    assert m.dtype == np.float32
    assert m[0, 0] == pytest.approx(1.5) and math.isnan(m[0, 1])
    assert m[1, 0] == pytest.approx(65.535) and m[1, 1] == pytest.approx(0.001)
    f = np.array([2.5, 0.0, np.nan, np.inf, -np.inf, -1.0], np.float64)
    out = g.depth_to_metres(f, "32FC1")
    assert out.dtype == np.float32 and out[0] == pytest.approx(2.5) and np.isnan(out[1:]).all()
    assert f[1] == 0.0  # the input is not modified
    with pytest.raises(ValueError, match="'mono16'.*16UC1.*32FC1"):
        g.depth_to_metres(mm, "mono16")
    with pytest.raises(ValueError, match="uint16"):
        g.depth_to_metres(f, "16UC1")


# --------------------------------------------------------------------------- stamp pairing


def test_stamp_pairing_nearest_within_tolerance():
    pairing = StampPairing()
    for stamp in (10.00, 10.10, 10.20):
        pairing.add(stamp, f"depth@{stamp:.2f}")
    assert pairing.match(10.13, 0.05) == "depth@10.10"
    assert pairing.match(10.17, 0.05) == "depth@10.20"
    assert pairing.match(10.29, 0.10) == "depth@10.20"
    assert pairing.match(10.31, 0.10) is None  # nearest is 0.11 s away
    assert pairing.match(9.5, 0.1) is None
    assert StampPairing().match(1.0, 10.0) is None


def test_stamp_pairing_capacity_is_bounded():
    pairing = StampPairing(capacity=10)
    for i in range(25):
        pairing.add(float(i), i)
    assert len(pairing) == 10
    assert pairing.match(0.0, 0.5) is None  # evicted
    assert pairing.match(14.9, 0.5) == 15 and pairing.match(24.0, 0.5) == 24
    assert pairing.match(3.0, 20.0) == 15  # the oldest left is the nearest
    with pytest.raises(ValueError, match="capacity"):
        StampPairing(0)


def test_stamp_pairing_concurrent_add_and_match():
    """An executor thread adds while a worker matches: unlocked, the worker's scan of the buffer
    raises 'deque mutated during iteration' within a few hundred matches."""
    pairing = StampPairing(capacity=2000)
    for i in range(2000):
        pairing.add(i * 0.01, i)
    errors, stop = [], threading.Event()

    def adder():
        i = 2000
        while not stop.is_set():
            pairing.add(i * 0.01, i)
            i += 1

    def matcher():
        try:
            for _ in range(300):
                pairing.match(10.0, 1e9)
        except RuntimeError as err:  # deque mutated during iteration
            errors.append(err)
        finally:
            stop.set()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, mid-scan
    try:
        threads = [threading.Thread(target=adder), threading.Thread(target=matcher)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors and len(pairing) == 2000
