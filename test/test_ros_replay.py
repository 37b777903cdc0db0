"""rosbag2 writing/reading with rosbags, and the replay node publishing over DDS."""
from __future__ import annotations

import hashlib
import logging

import cv2
import numpy as np
import pytest
import yaml
from rcl_interfaces.msg import ParameterType
from rclpy.parameter import Parameter
from sensor_msgs.msg import Image

from conftest import NodeProcess, random_frame, stamp_of
from ros_anomaly_diffusion.core.data import open_dataset
from ros_anomaly_diffusion.ros import bag, image_codec
from ros_anomaly_diffusion.ros.replay_node import PARAMETERS, ReplayNode
from ros_anomaly_diffusion.ros.sources import FrameSource

# The graph tests wait for conditions, never for fixed times: long limits cost nothing on an
# idle machine and keep them correct on a loaded one (processes start and discover slowly).
pytestmark = [pytest.mark.timeout(400)]
WAIT = 180.0

START = 1_700_000_000 * 10**9
PERIOD = 100_000_000  # stamps of the small test bags: START + i * PERIOD


@pytest.fixture(scope="module")
def frames3(rugd_sample):
    return [f.rgb() for f in open_dataset(rugd_sample)[:3]]


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_folder_to_bag_round_trip(tmp_path, frames3, storage, rugd_sample):
    out = tmp_path / "bag"
    n = bag.folder_to_bag(rugd_sample, out, topic="/rugd/image", rate_hz=4.0, storage=storage,
                          frame_id="rugd_cam", count=3)
    assert n == 3
    assert (out / "metadata.yaml").is_file()
    assert any(out.glob("*.mcap" if storage == "mcap" else "*.db3"))
    assert bag.image_topics(out) == {"/rugd/image": ("sensor_msgs/msg/Image", 3)}
    got = list(bag.iter_bag_frames(out))
    assert [s for s, _, _ in got] == [START, START + 250_000_000, START + 500_000_000]
    assert {f for _, f, _ in got} == {"rugd_cam"}
    for (_, _, rgb), ref in zip(got, frames3):
        assert rgb.shape == ref.shape == (550, 688, 3)
        np.testing.assert_array_equal(rgb, ref)
    stamps = [s for s, _ in bag.iter_bag_images(out, topic="/rugd/image")]
    assert all(b > a for a, b in zip(stamps, stamps[1:]))


def test_bag_readable_by_the_typestore_as_ros2_messages(tmp_path, rugd_sample):
    """What `ros2 bag play` will see: CDR-serialised sensor_msgs/msg/Image, rgb8, unpadded."""
    from rosbags.rosbag2 import Reader
    from rosbags.typesys import Stores, get_typestore

    out = tmp_path / "bag"
    bag.folder_to_bag(rugd_sample, out, count=1)
    store = get_typestore(Stores.ROS2_JAZZY)  # a newer distro's definitions read it too
    meta = yaml.safe_load((out / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert meta["version"] == 8 and meta["storage_identifier"] == "sqlite3"
    with Reader(out) as reader:
        (conn,) = reader.connections
        assert (conn.topic, conn.msgtype) == ("/camera/image", "sensor_msgs/msg/Image")
        (_, t, raw), = list(reader.messages())
        msg = store.deserialize_cdr(raw, conn.msgtype)
    assert (msg.encoding, msg.height, msg.width, msg.step, msg.is_bigendian) == ("rgb8", 550, 688, 688 * 3, 0)
    assert t == START and msg.header.stamp.sec == START // 10**9


def test_compressed_topics_and_topic_choice(tmp_path, frames3):
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    C = store.types["sensor_msgs/msg/CompressedImage"]
    H = store.types["std_msgs/msg/Header"]
    T = store.types["builtin_interfaces/msg/Time"]
    small = [f[:64, :80].copy() for f in frames3]
    out = tmp_path / "two_topics"
    with Writer(out, version=8, storage_plugin=StoragePlugin.MCAP) as w:
        c1 = w.add_connection("/front/image/compressed", C.__msgtype__, typestore=store)
        c2 = w.add_connection("/rear/image/compressed", C.__msgtype__, typestore=store)
        for i, rgb in enumerate(small):
            ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            msg = C(header=H(stamp=T(sec=10 + i, nanosec=0), frame_id="front"), format="png",
                    data=png.reshape(-1))
            w.write(c1, (10 + i) * 10**9, store.serialize_cdr(msg, C.__msgtype__))
            w.write(c2, (10 + i) * 10**9, store.serialize_cdr(msg, C.__msgtype__))
    with pytest.raises(ValueError, match="several image topics"):
        next(bag.iter_bag_images(out))
    with pytest.raises(ValueError, match="no Image/CompressedImage topic '/side/image'"):
        next(bag.iter_bag_images(out, topic="/side/image"))
    got = list(bag.iter_bag_images(out, topic="/front/image/compressed"))
    assert [s for s, _ in got] == [10 * 10**9, 11 * 10**9, 12 * 10**9]
    for (_, rgb), ref in zip(got, small):
        np.testing.assert_array_equal(rgb, ref)
    # the replay node picks its topic by the same rule
    with pytest.raises(ValueError, match="several image topics .*; choose one with bag_topic"):
        FrameSource(out)
    source = FrameSource(out, "rear/image/compressed")
    assert (source.bag_topic, source.length) == ("/rear/image/compressed", 3)


@pytest.mark.parametrize("name, absolute", [("camera/image", "/camera/image"), ("/camera/image", "/camera/image"),
                                            ("image", "/image"), ("/ns/image/compressed", "/ns/image/compressed")])
def test_absolute_topic(name, absolute):
    assert bag.absolute_topic(name) == absolute


def test_pick_image_topic():
    assert bag.pick_image_topic("b", ["/cam/image"]) == "/cam/image"
    assert bag.pick_image_topic("b", ["/front", "/rear"], "rear") == "/rear"
    assert bag.pick_image_topic("b", {"/front": ("t", 3)}, "/front") == "/front"
    with pytest.raises(ValueError, match=r"bag b has several image topics \['/front', '/rear'\]; choose one with "
                                         r"topic="):
        bag.pick_image_topic("b", ["/rear", "/front"])
    with pytest.raises(ValueError, match="has no image topics"):
        bag.pick_image_topic("b", [])
    with pytest.raises(ValueError, match=r"no Image/CompressedImage topic '/side'; image topics: \['/front'\]"):
        bag.pick_image_topic("b", ["/front"], "side")


def test_replay_parameters_are_declared_with_descriptors(ros, rugd_sample):
    """The replay node declares its parameters like the detector (ros/params.py: ParamSpec,
    descriptor): typed, described, read-only, choices named and checked; integer rates accepted."""
    node = ReplayNode(parameter_overrides=[Parameter("source", value=str(rugd_sample)),
                                           Parameter("rate_hz", value=2)])
    try:
        assert node.rate_hz == 2.0
        d = {x.name: x for x in node.describe_parameters(list(PARAMETERS))}
        assert all(x.read_only and x.description for x in d.values())
        assert d["rate_hz"].type == ParameterType.PARAMETER_DOUBLE and d["loop"].type == ParameterType.PARAMETER_BOOL
        assert d["stamp_source"].additional_constraints == "one of: clock, bag"
    finally:
        node.destroy_node()
    with pytest.raises(ValueError, match=r"stamp_source must be one of \['clock', 'bag'\], got 'gps'"):
        ReplayNode(parameter_overrides=[Parameter("source", value=str(rugd_sample)),
                                        Parameter("stamp_source", value="gps")])


def test_bag_main_cli(tmp_path, capsys, rugd_sample):
    out = tmp_path / "cli_bag"
    assert bag.bag_main(["--data", str(rugd_sample), "--out", str(out), "--storage", "mcap",
                         "--topic", "cam/image", "--rate", "2", "--count", "2"]) == 0
    assert "wrote 2 frames" in capsys.readouterr().out
    assert bag.image_topics(out) == {"/cam/image": ("sensor_msgs/msg/Image", 2)}
    assert bag.bag_main(["--data", str(rugd_sample), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert bag.bag_main(["--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "b2")]) == 2
    assert "does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- unreadable frames


def _small_frames(n: int = 6) -> list[np.ndarray]:
    return [random_frame(32, 40, seed=i) for i in range(n)]


def _bag_with_a_bad_frame(out, frames, bad: int, how: str):
    """rgb8 Images stamped START + i * PERIOD; message `bad` is broken: "cdr" (its serialised
    blob cut short) or "data" (data one row shorter than height * step)."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    Img, H, T = (store.types[t] for t in ("sensor_msgs/msg/Image", "std_msgs/msg/Header",
                                          "builtin_interfaces/msg/Time"))
    with Writer(out, version=8, storage_plugin=StoragePlugin.MCAP) as writer:
        conn = writer.add_connection("/camera/image", Img.__msgtype__, typestore=store)
        for i, rgb in enumerate(frames):
            t = START + i * PERIOD
            h, w = rgb.shape[:2]
            data = rgb.reshape(-1)[: -w * 3 if (i == bad and how == "data") else None]
            msg = Img(header=H(stamp=T(sec=t // 10**9, nanosec=t % 10**9), frame_id="cam"), height=h, width=w,
                      encoding="rgb8", is_bigendian=0, step=w * 3, data=data)
            raw = store.serialize_cdr(msg, Img.__msgtype__)
            writer.write(conn, t, raw[: len(raw) // 2] if (i == bad and how == "cdr") else raw)
    return out


@pytest.mark.parametrize("how", ["cdr", "data"])
def test_iter_bag_frames_skips_an_undecodable_message(tmp_path, how, caplog):
    frames = _small_frames()
    out = _bag_with_a_bad_frame(tmp_path / "bag", frames, bad=2, how=how)
    errors = []
    got = list(bag.iter_bag_frames(out, on_error=lambda i, t, err: errors.append((i, t, err))))
    assert [s for s, _, _ in got] == [START + i * PERIOD for i in (0, 1, 3, 4, 5)]
    for (_, _, rgb), i in zip(got, (0, 1, 3, 4, 5)):
        np.testing.assert_array_equal(rgb, frames[i])
    assert [(i, t) for i, t, _ in errors] == [(2, START + 2 * PERIOD)]
    if how == "data":
        assert isinstance(errors[0][2], image_codec.FrameError)
    # without on_error: a warning on the package's logger, and the iteration goes on
    with caplog.at_level(logging.WARNING, logger="ros_anomaly_diffusion"):
        assert [s for s, _ in bag.iter_bag_images(out)] == [s for s, _, _ in got]
    assert [r.name for r in caplog.records] == ["ros_anomaly_diffusion.ros.bag"]
    assert "message 2" in caplog.text


def test_folder_source_skips_an_unreadable_image(tmp_path):
    frames = _small_frames()
    for i, rgb in enumerate(frames):
        assert cv2.imwrite(str(tmp_path / f"frame_{i}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    png = (tmp_path / "frame_2.png").read_bytes()
    (tmp_path / "frame_2.png").write_bytes(png[: len(png) // 2])  # a truncated file
    errors = []
    got = [f.rgb for f in FrameSource(tmp_path).iterate(lambda i, which, err: errors.append((i, which)))]
    assert len(got) == 5
    for rgb, i in zip(got, (0, 1, 3, 4, 5)):
        np.testing.assert_array_equal(rgb, frames[i])
    assert errors == [(2, str(tmp_path / "frame_2.png"))]


# --------------------------------------------------------------------------- over DDS


REPLAY_MAIN = "import sys; from ros_anomaly_diffusion.ros.replay_node import replay_main; sys.exit(replay_main())"


def _replay_main(*args: str) -> NodeProcess:
    return NodeProcess("python", ["-c", REPLAY_MAIN, *args, "--wait-subscribers", str(WAIT)])


def _receive(probe, box, proc, n: int) -> list[Image]:
    """Spin until `n` messages are in `box` or the process has ended (its last frames may still be
    on the way, hence the short drain); the subscription must exist before the process starts,
    so that its wait for a subscriber finds it."""
    probe.spin_until(lambda: len(box) >= n or not proc.alive(), WAIT, f"{n} images")
    probe.spin_until_or_timeout(lambda: len(box) >= n, 5.0)
    assert len(box) >= n, f"{len(box)} of {n} images:\n{proc.output}"
    return [m for _, m in box]


def _index_by_content(frames) -> dict[bytes, int]:
    return {hashlib.sha1(np.ascontiguousarray(f).tobytes()).digest(): i for i, f in enumerate(frames)}


def _frame_index(msg, index: dict[bytes, int]) -> int:
    """Which source frame the message carries (its pixels byte for byte); -1 for none."""
    return index.get(hashlib.sha1(image_codec.image_to_rgb(msg).tobytes()).digest(), -1)


def test_replay_node_publishes_a_folder(spawn, probe, rugd_sample):
    """A looping replay of full-size frames: every message is a source frame, byte for byte, and
    consecutive ones follow the source order (the probe may join after the first frames)."""
    frames = [f.rgb() for f in open_dataset(rugd_sample)]
    box = probe.collect(Image, "/replay/image")
    node = spawn("replay_node", "--ros-args", "-p", f"source:={rugd_sample}", "-p", "topic:=/replay/image",
                 "-p", "rate_hz:=8", "-p", "loop:=true", "-p", f"wait_for_subscribers:={WAIT}")
    msgs = _receive(probe, box, node, 4)
    assert node.alive(), node.output
    index = _index_by_content(frames)
    idx = [_frame_index(m, index) for m in msgs]
    assert -1 not in idx and all(b == (a + 1) % len(frames) for a, b in zip(idx, idx[1:])), idx
    assert {(m.encoding, m.width, m.height, m.header.frame_id) for m in msgs} == {("rgb8", 688, 550, "camera")}
    stamps = [stamp_of(m) for m in msgs]
    assert all(b > a for a, b in zip(stamps, stamps[1:]))
    assert node.sigint() == 0 and "Traceback" not in node.output


def test_replay_main_plays_a_bag_with_its_stamps(tmp_path, probe, frames3, rugd_sample):
    out = tmp_path / "bag"
    bag.folder_to_bag(rugd_sample, out, rate_hz=5.0, storage="mcap", frame_id="rugd_cam", count=3)
    box = probe.collect(Image, "/bag/image")
    proc = _replay_main("--source", str(out), "--topic", "/bag/image", "--rate", "20", "--count", "3",
                        "--stamps", "bag")
    try:
        msgs = _receive(probe, box, proc, 3)
        assert proc.wait(WAIT) == 0, proc.output
    finally:
        proc.kill()
    by_stamp = {stamp_of(m): m for m in msgs}
    assert sorted(by_stamp) == [(START // 10**9, 0), (START // 10**9, 200_000_000), (START // 10**9, 400_000_000)]
    assert len(msgs) == 3 and {m.header.frame_id for m in msgs} == {"rugd_cam"}
    for stamp, ref in zip(sorted(by_stamp), frames3):
        np.testing.assert_array_equal(image_codec.image_to_rgb(by_stamp[stamp]), ref)
    assert "reached count 3: published 3 frames, skipped 0 unreadable" in proc.output


def test_replay_skips_an_unreadable_bag_message(tmp_path, probe):
    frames = _small_frames()
    out = _bag_with_a_bad_frame(tmp_path / "bag", frames, bad=2, how="cdr")
    box = probe.collect(Image, "/bad/image")
    proc = _replay_main("--source", str(out), "--topic", "/bad/image", "--rate", "10", "--stamps", "bag")
    try:
        msgs = _receive(probe, box, proc, 5)
        assert proc.wait(WAIT) == 0, proc.output
    finally:
        proc.kill()
    index = _index_by_content(frames)
    assert sorted((stamp_of(m), _frame_index(m, index)) for m in msgs) == [
        ((START // 10**9, i * PERIOD), i) for i in (0, 1, 3, 4, 5)]
    assert "skipping unreadable frame 2 (bag time" in proc.output
    assert "end of source: published 5 frames, skipped 1 unreadable" in proc.output
    assert "Traceback" not in proc.output


def test_replay_loops_over_the_readable_frames(tmp_path, probe):
    """With loop, every readable frame comes again in order, the unreadable one never."""
    frames = _small_frames()
    out = _bag_with_a_bad_frame(tmp_path / "bag", frames, bad=2, how="data")
    box = probe.collect(Image, "/loop/image")
    proc = _replay_main("--source", str(out), "--topic", "/loop/image", "--rate", "10", "--loop", "--count", "12")
    try:
        _receive(probe, box, proc, 5)
        assert proc.wait(WAIT) == 0, proc.output
        probe.spin_until_or_timeout(lambda: len(box) >= 12, 5.0)  # the rest of what has arrived
    finally:
        proc.kill()
    sent = [0, 1, 3, 4, 5] * 2 + [0, 1]
    index = _index_by_content(frames)
    got = [_frame_index(m, index) for _, m in box]
    # The replay keeps its last 5 frames for a subscriber whose side of discovery ends late;
    # earlier ones may be gone by then, the rest comes in order.
    assert len(got) >= 5 and got == sent[-len(got):], got
    assert "reached count 12: published 12 frames, skipped 2 unreadable" in proc.output


def test_replay_stops_on_a_source_without_a_readable_frame(tmp_path, spawn):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    node = spawn("replay_node", "--ros-args", "-p", f"source:={tmp_path}", "-p", "loop:=true")
    assert node.wait(WAIT) == 1, node.output
    assert f"no readable frame in image folder {tmp_path}: published 0 frames, skipped 1 unreadable" in node.output
    assert "Traceback" not in node.output


def test_replay_reports_a_missing_source(spawn, tmp_path):
    node = spawn("replay_node", "--ros-args", "-p", f"source:={tmp_path / 'missing'}")
    assert node.wait(WAIT) != 0
    assert "does not exist" in node.output and "Traceback" not in node.output
