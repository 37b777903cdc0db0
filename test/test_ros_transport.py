"""Camera-sized frames over best effort: the DDS settings every process of the package uses,
and full-size RUGD frames from the replay node reaching a best-effort subscriber."""
from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image

from conftest import ROOT
from ros_anomaly_diffusion.core.data import open_dataset
from ros_anomaly_diffusion.ros import image_codec
from ros_anomaly_diffusion.ros.transport import FASTDDS_PROFILE, large_frame_env

CONFIG = ROOT / "config"
FULL_FRAME = 688 * 550 * 3  # a RUGD frame as rgb8


def test_fastdds_profile_is_used_unless_the_user_configured_fastdds():
    env = large_frame_env({}, CONFIG)
    assert env == {"FASTDDS_DEFAULT_PROFILES_FILE": str(CONFIG / FASTDDS_PROFILE)}
    assert large_frame_env({"RMW_IMPLEMENTATION": "rmw_fastrtps_cpp"}, CONFIG) == env
    for own in ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE", "FASTDDS_BUILTIN_TRANSPORTS"):
        assert large_frame_env({own: "mine"}, CONFIG) == {}


def test_cyclonedds_gets_its_config_unless_the_user_set_one():
    env = large_frame_env({"RMW_IMPLEMENTATION": "rmw_cyclonedds_cpp"}, CONFIG)
    assert list(env) == ["CYCLONEDDS_URI"] and env["CYCLONEDDS_URI"].startswith("file:///")
    root = ET.parse(env["CYCLONEDDS_URI"][len("file://"):]).getroot()
    buf = root.find(".//{https://cdds.io/config}SocketReceiveBufferSize")
    assert buf is not None and buf.get("min") == "default" and buf.get("max")
    assert large_frame_env({"RMW_IMPLEMENTATION": "rmw_cyclonedds_cpp", "CYCLONEDDS_URI": "x"}, CONFIG) == {}
    assert large_frame_env({"RMW_IMPLEMENTATION": "rmw_zenoh_cpp"}, CONFIG) == {}


def test_fastdds_profile_carries_full_frames_in_shared_memory():
    ns = {"d": "http://www.eprosima.com"}
    root = ET.parse(CONFIG / FASTDDS_PROFILE).getroot()
    shm = [t for t in root.iterfind(".//d:transport_descriptor", ns) if t.findtext("d:type", None, ns) == "SHM"]
    assert len(shm) == 1 and int(shm[0].findtext("d:segment_size", None, ns)) >= 4 * FULL_FRAME
    participant = root.find(".//d:participant", ns)
    assert participant.get("is_default_profile") == "true"
    used = [e.text for e in participant.iterfind(".//d:userTransports/d:transport_id", ns)]
    assert shm[0].findtext("d:transport_id", None, ns) in used and len(used) == 2  # SHM + UDPv4 (discovery)


@pytest.mark.timeout(300)
def test_full_size_frames_reach_a_best_effort_subscriber(spawn, probe, rugd_sample):
    """The replay node's full-size RUGD frames (1.1 MB) at 4 Hz, received by a best-effort
    subscriber (the sensor-data QoS of camera consumers): once the two sides have matched,
    not one frame is lost. (The replay starts when *it* sees the subscriber; the first frames
    may precede the subscriber's side of discovery, and best effort does not repair them.)"""
    frames = {f.rgb().tobytes(): i for i, f in enumerate(open_dataset(rugd_sample))}
    n, count = len(frames), len(frames) + 10
    box: list[Image] = []
    probe.node.create_subscription(Image, "/transport/image", box.append, qos_profile_sensor_data)
    node = spawn("replay_node", "--ros-args", "-p", f"source:={rugd_sample}", "-p", "topic:=/transport/image",
                 "-p", "rate_hz:=4.0", "-p", "loop:=true", "-p", f"count:={count}",
                 "-p", "wait_for_subscribers:=120.0")
    probe.spin_until(lambda: f"reached count {count}" in node.output, 240, "the end of the replay")
    probe.spin_until_or_timeout(lambda: len(box) >= count, 10)  # the last frames may still be on their way
    assert [(m.width, m.height) for m in box] == [(688, 550)] * len(box)
    got = [frames.get(image_codec.image_to_rgb(m).tobytes()) for m in box]
    assert None not in got, "a frame arrived corrupted"
    # the sample one and a half times over, in order: whatever arrived is a gap-free run (the
    # first frames may precede discovery, the last may go down with the exiting publisher)
    assert len(got) >= count - 4, (got, node.output)
    assert all(b == (a + 1) % n for a, b in zip(got, got[1:])), got
