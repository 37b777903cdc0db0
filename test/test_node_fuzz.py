"""The detector node under a storm of fuzzed messages (hypothesis), over real DDS.

Thousands of raw and compressed images from the codec fuzzer's strategies (junk encodings,
zero and odd sizes, short and padded steps, both byte orders, truncated and oversized data,
NaN floats, corrupt PNG/JPEG) go to a node process, with a good frame every few hundred: the
node stays alive, answers every good frame, and its /diagnostics counters add up exactly:
every message sent is received, and every received one is processed, dropped for a newer
one, or counted as one kind of bad input.
"""
from __future__ import annotations

from collections import Counter

import pytest
from diagnostic_msgs.msg import DiagnosticArray
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image

from conftest import detector_args, random_frame, send_until, stamped_image
from ros_anomaly_diffusion.ros.soak import NodeCounters
from test_codec_fuzz import compressed_messages, raw_messages

pytestmark = pytest.mark.timeout(600)

MESSAGES = 2500
GOOD_EVERY = 500
CAM = "/fuzz/image"
# The node's subscription holds 100 messages (reliable): never run further ahead than this.
AHEAD = 60


def ros_image(m, sec: int) -> Image | None:
    """The fuzzed fields as a sensor_msgs/Image; None when ROS cannot carry them (negative sizes)."""
    if m.height < 0 or m.width < 0:
        return None
    msg = Image(height=m.height, width=m.width, step=m.step % 2**32, is_bigendian=int(m.is_bigendian),
                encoding=m.encoding, data=bytes(m.data) if m.data is not None else b"")
    msg.header.stamp.sec = sec
    return msg


def ros_compressed(m, sec: int) -> CompressedImage:
    msg = CompressedImage(format=m.format, data=bytes(m.data))
    msg.header.stamp.sec = sec
    return msg


def test_node_survives_fuzzed_messages_and_its_counters_add_up(spawn, probe, tiny_checkpoint):
    node = spawn("detector_node", *detector_args(
        tiny_checkpoint, "-p", "steps:=2", "-p", "segments:=none", "-r", f"image:={CAM}",
        "-p", "qos_reliability:=reliable", "-p", "qos_depth:=100", "-p", "subscribe_compressed:=true",
        "-p", "diagnostics_period:=0.2"))
    node.wait_for_output(r"listening on /fuzz/image", timeout=120)
    qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1000, reliability=ReliabilityPolicy.RELIABLE)
    raw_pub = probe.node.create_publisher(Image, CAM, qos)
    compressed_pub = probe.node.create_publisher(CompressedImage, CAM + "/compressed", qos)
    masks = probe.collect(Image, "/anomaly/mask", depth=100)
    counters = NodeCounters()
    probe.node.create_subscription(DiagnosticArray, "/diagnostics", counters.on_message, 10)

    def received() -> int:
        return int((counters.latest or {}).get("frames_received", 0))

    probe.wait_for_subscriber(raw_pub)
    probe.wait_for_subscriber(compressed_pub)
    sent = Counter()

    def publish(pub, msg) -> None:
        pub.publish(msg)
        sent["messages"] += 1
        if sent["messages"] % 20 == 0:  # let the node's executor keep up (its queue holds 100)
            probe.spin_until(lambda: sent["messages"] - received() < AHEAD, 120,
                             "the node to catch up with the fuzzed messages")

    def good_frame(k: int) -> None:
        msg = stamped_image(random_frame(seed=k + 1), 1_000_000 + k + 1, frame_id="good")
        before = sent["messages"]
        send_until(probe, _Counting(raw_pub, sent), masks, msg, timeout=120, resend=3.0)
        sent["good"] += sent["messages"] - before

    # generate only: shrinking or explaining a failure would replay messages into the stateful node
    @settings(max_examples=MESSAGES, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.one_of(raw_messages(), compressed_messages().map(lambda case: case[0])))
    def storm(m):
        i = sent["examples"]
        sent["examples"] += 1
        if hasattr(m, "format"):
            publish(compressed_pub, ros_compressed(m, 10_000 + i))
        else:
            msg = ros_image(m, 10_000 + i)
            if msg is None:
                sent["not_representable"] += 1
                return
            publish(raw_pub, msg)
        if i % GOOD_EVERY == GOOD_EVERY - 1:
            good_frame(i)

    good_frame(-1)
    storm()
    good_frame(MESSAGES)
    assert node.alive() and "Traceback" not in node.output

    probe.spin_until(lambda: received() >= sent["messages"], 60, "every message to reach the node")
    counts = counters.settled(probe.spin_for, timeout=60)  # received == processed + dropped + bad + errors
    assert counts["frames_received"] == sent["messages"], (dict(sent), counts)
    bad = {k[len("bad_input_"):]: v for k, v in counts.items() if k.startswith("bad_input_")}
    print(f"\nfuzz: {dict(sent)}; node: {counts}")
    assert sent["examples"] >= 0.9 * MESSAGES and sent["messages"] >= 2000
    assert len(bad) == 5 and all(bad.values()), bad  # every kind of fault was exercised
    assert counts["inference_errors"] == 0
    assert counts["frames_processed"] >= MESSAGES // GOOD_EVERY + 2  # every good frame at least


class _Counting:
    """A publisher whose publish() is counted in `sent` (send_until re-sends a good frame)."""

    def __init__(self, pub, sent: Counter):
        self._pub, self._sent = pub, sent

    def publish(self, msg) -> None:
        self._pub.publish(msg)
        self._sent["messages"] += 1
