"""anomaly/points over DDS: a mask with a known blob, a CameraInfo and the camera's static pose
give a PointCloud2 where hand-worked geometry puts it (flat ground, and an aligned depth image).
The node runs in this process so that its model can be made to output the known blob; camera
info, image, depth and the cloud travel over DDS."""
from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.parameter import Parameter
from sensor_msgs.msg import CameraInfo, Image, PointCloud2

from conftest import random_frame, stamp_of, stamped_image
from ros_anomaly_diffusion.core.detector import FrameResult
from ros_anomaly_diffusion.ros.image_codec import FrameError
from ros_anomaly_diffusion.ros.pointcloud import cloud_to_points

pytestmark = pytest.mark.timeout(300)

H, W = 240, 320
FX = FY = 200.0
CX, CY = 159.5, 119.5
HEIGHT, PITCH = 1.5, 0.3  # camera 1.5 m above base_link's ground, pitched down 0.3 rad
BLOB = (slice(150, 170), slice(140, 180))  # rows, columns below the principal point


def camera_info(sec: int) -> CameraInfo:
    info = CameraInfo(width=W, height=H, distortion_model="plumb_bob", d=[0.0] * 5)
    info.k = [FX, 0.0, CX, 0.0, FY, CY, 0.0, 0.0, 1.0]
    info.header.stamp.sec, info.header.frame_id = sec, "cam_optical"
    return info


def depth_image(sec: int, metres: float) -> Image:
    msg = Image(height=H, width=W, encoding="32FC1", is_bigendian=0, step=W * 4)
    msg.data = np.full((H, W), metres, np.float32).tobytes()
    msg.header.stamp.sec, msg.header.frame_id = sec, "cam_optical"
    return msg


def blob_result(rgb):
    mask = np.zeros(rgb.shape[:2], bool)
    mask[BLOB] = True
    score = mask.astype(np.float32)
    return FrameResult(score, mask, 0.0, False)


@pytest.mark.parametrize("mode", ["ground", "depth"])
def test_a_known_blob_lands_where_the_geometry_says(ros, probe, tiny_checkpoint, mode):
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.lifecycle import TransitionCallbackReturn

    from ros_anomaly_diffusion.ros.detector_node import DetectorNode

    ns, topic = f"/pts_{mode}", f"/pts_{mode}_cam/image_raw"
    pitch = PITCH if mode == "ground" else 0.0
    params = {"checkpoint": str(tiny_checkpoint), "variant": "ddim", "steps": 2, "segments": "none",
              "qos_reliability": "reliable", "pose_source": "static", "camera_xyz": [0.0, 0.0, HEIGHT],
              "point_stride": 4, "max_range": 50.0,
              "camera_rpy": [-math.pi / 2 - pitch, 0.0, -math.pi / 2], "diagnostics_period": 0.3}
    if mode == "depth":
        params["depth_topic"] = f"/pts_{mode}_cam/depth"
    node = DetectorNode(parameter_overrides=[Parameter(k, value=v) for k, v in params.items()],
                        cli_args=["--ros-args", "-r", f"image:={topic}", "-r", f"__ns:={ns}"])
    executor = SingleThreadedExecutor()
    spinner = threading.Thread(target=executor.spin, daemon=True)
    try:
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        node.runtime.detector.process_batch = lambda frames: [blob_result(f) for f in frames]
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        executor.add_node(node)
        spinner.start()
        clouds = probe.collect(PointCloud2, f"{ns}/anomaly/points")
        diag = probe.collect(DiagnosticArray, "/diagnostics")
        pub = probe.publisher(Image, topic)
        info_pub = probe.publisher(CameraInfo, f"/pts_{mode}_cam/camera_info")  # beside the image topic
        depth_pub = probe.publisher(Image, params.get("depth_topic", "/unused"))
        probe.wait_for_subscriber(pub)
        probe.wait_for_subscriber(info_pub)

        def send(sec):
            info_pub.publish(camera_info(sec))
            if mode == "depth":
                depth_pub.publish(depth_image(sec, 4.0))
            probe.spin_for(0.2)
            pub.publish(stamped_image(random_frame(H, W, seed=sec), sec, frame_id="cam_optical"))

        def arrived(sec):
            return [m for _, m in clouds if stamp_of(m) == (sec, 0)]

        sec = 100
        send(sec)
        while not probe.spin_until_or_timeout(lambda: arrived(sec), 3.0):
            sec += 1  # the first CameraInfo / depth may arrive after the first frame: send another
            assert sec < 130, "no anomaly/points"
            send(sec)
        cloud = arrived(sec)[0]

        def diagnostics():
            for _, arr in reversed(diag):
                v = {kv.key: kv.value for kv in arr.status[0].values}
                if v.get("input_topic") == topic and v.get("points_p50_ms", "n/a") != "n/a":
                    return v
            return None

        probe.spin_until(diagnostics, 10, "points_p50_ms in /diagnostics")
        values = diagnostics()
    finally:
        executor.shutdown()
        node.stop()
        node.destroy_node()

    assert cloud.header.frame_id == "base_link" and stamp_of(cloud) == (sec, 0)
    pts = cloud_to_points(cloud)
    rows = np.arange(150, 170, 4)  # grid_pixels samples pixels 2, 6, 10, ... (stride 4, offset 2)
    cols = np.arange(142, 180, 4)
    assert len(pts) == len(rows) * len(cols)
    if mode == "ground":
        # pixel row v looks (v - cy)/fy below the optical axis: it meets the ground at h / tan(p + atan(...))
        np.testing.assert_allclose(pts[:, 2], 0.0, atol=1e-5)
        near = HEIGHT / math.tan(PITCH + math.atan((rows[-1] - CY) / FY))
        far = HEIGHT / math.tan(PITCH + math.atan((rows[0] - CY) / FY))
        assert pts[:, 0].min() == pytest.approx(near, rel=1e-5) and pts[:, 0].max() == pytest.approx(far, rel=1e-5)
        # columns left of the principal point are to the left (+y); the blob straddles it a little
        assert (pts[:, 1] > 0).sum() == len(rows) * int((cols < CX).sum())
    else:
        # a level camera at 1.5 m: optical (X, Y, Z=4) is base_link (4, -X, 1.5 - Y)
        uu, vv = np.meshgrid(cols, rows)
        expected = np.stack([np.full(uu.size, 4.0), -(uu.ravel() - CX) / FX * 4.0,
                             HEIGHT - (vv.ravel() - CY) / FY * 4.0], axis=1)
        np.testing.assert_allclose(pts, expected, atol=1e-5)
    assert values["points_pose_source"] == "static" and values["points_skipped_transform"] == "0"
    print(f"{mode}: {len(pts)} points, projection p50 {values['points_p50_ms']} ms")



def test_bad_camera_info_or_depth_publishes_no_points_and_says_why():
    from std_msgs.msg import Header

    from ros_anomaly_diffusion.ros.points import AnomalyPoints, PointsConfig

    mask = np.zeros((H, W), bool)
    mask[BLOB] = True
    header = Header(frame_id="cam_optical")
    header.stamp.sec = 5
    pts = AnomalyPoints(PointsConfig(), depth=True)
    assert pts.cloud(header, mask) == (None, "no_camera_info: no CameraInfo received yet")
    uncalibrated = camera_info(5)
    uncalibrated.k = [0.0] * 9
    pts.on_camera_info(uncalibrated)
    cloud, reason = pts.cloud(header, mask)
    assert cloud is None and reason.startswith("camera: ") and "uncalibrated" in reason
    pts.on_camera_info(camera_info(5))
    assert pts.cloud(header, mask)[1].startswith("no_depth: no depth frame within 0.05 s")
    wrong = depth_image(5, 4.0)
    wrong.encoding = "rgb8"
    pts.on_depth(wrong)
    cloud, reason = pts.cloud(header, mask)
    assert cloud is None and reason.startswith("depth: unsupported depth encoding 'rgb8'")
    assert dict(pts.skipped) == {"no_camera_info": 1, "camera": 1, "no_depth": 1, "depth": 1}
    with pytest.raises(FrameError):  # what the node counts as a depth skip is the codec's refusal
        from ros_anomaly_diffusion.ros.pointcloud import depth_image_to_metres
        depth_image_to_metres(wrong)
