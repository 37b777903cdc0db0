"""ROS 2 node `image_replay`: publish a dataset folder or a rosbag2 as a camera topic.

Sources: a RUGD-format folder (images/ + annotations/ + colormap) or a plain image folder
(frames in name order, via core.data.open_dataset), or a rosbag2 (folder with
metadata.yaml, or a .db3 / .mcap file; sqlite3 or mcap; a sensor_msgs/Image or
CompressedImage topic, read with the rosbags library, no rosbag2_py needed).

Output: sensor_msgs/Image rgb8 on `topic` (reliable, keep last 5: matches best-effort and
reliable subscribers) at `rate_hz`, driven by a timer on the node clock, so with
use_sim_time:=true it follows /clock. Header stamps: `stamp_source` "clock" (now, default)
or "bag" (the recorded header stamps; folders have none and use the clock).

Parameters: source, topic (camera/image), rate_hz (5.0), loop (false), frame_id ("": the
bag's frame_id, "camera" for folders), count (0: all frames / forever with loop),
stamp_source (clock | bag), bag_topic ("": the bag's only image topic),
wait_for_subscribers (seconds to wait for a subscriber before the first frame, 0: don't).

A frame that cannot be read (corrupt image file, undecodable bag message) is logged
(throttled), counted and skipped; the end reports "published N frames, skipped M unreadable".
A source without a single readable frame stops the node with an error (exit code 1).

`replay_main(argv)` is the `ros-anomaly-diffusion replay` subcommand:
  ros-anomaly-diffusion replay --source PATH [--topic /camera/image] [--rate 5] [--loop] [--count N]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import rclpy
from rclpy.duration import Duration
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.time import Time
from rosbags.rosbag2 import ReaderError
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from . import image_codec
from .params import ParamSpec, declare_parameters
from .sources import FrameSource
from .spin import run_node

NODE_NAME = "image_replay"
# How long the end of a replay waits for reliable subscribers to acknowledge the last frames.
ACK_TIMEOUT_S = 10.0

# Declared like the detector's (ros/params.py); all read once at start.
PARAMETERS: dict[str, ParamSpec] = {p.name: p for p in (
    ParamSpec("source", "", "dataset folder (RUGD format or plain images) or rosbag2 to publish", read_only=True),
    ParamSpec("topic", "camera/image", "output sensor_msgs/Image topic", read_only=True),
    ParamSpec("rate_hz", 5.0, "frames per second", read_only=True),
    ParamSpec("loop", False, "start again after the last frame", read_only=True),
    ParamSpec("frame_id", "", "header frame_id; empty: the bag's, or 'camera' for folders", read_only=True),
    ParamSpec("count", 0, "stop after this many frames (0: all, or forever with loop)", read_only=True),
    ParamSpec("stamp_source", "clock", "header stamps: clock (now) or bag (recorded stamps)",
              choices=("clock", "bag"), read_only=True),
    ParamSpec("bag_topic", "", "image topic to read from a bag; empty: its only image topic", read_only=True),
    ParamSpec("wait_for_subscribers", 0.0, "seconds to wait for a subscriber before the first frame",
              read_only=True),
)}


class ReplayNode(Node):
    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        declare_parameters(self, PARAMETERS.values())  # ValueError for a wrong type on the command line
        for p in PARAMETERS.values():
            reason = p.check(self.get_parameter(p.name).value)
            if reason:
                raise ValueError(f"invalid parameter: {reason}")
        g = lambda n: self.get_parameter(n).value  # noqa: E731
        self.rate_hz = float(g("rate_hz"))
        self.loop, self.count = bool(g("loop")), int(g("count"))
        self.frame_id, self.stamp_source = str(g("frame_id")), str(g("stamp_source"))
        self.wait_for_subscribers = float(g("wait_for_subscribers"))
        if not g("source"):
            raise ValueError("parameter 'source' is empty: pass a dataset folder or rosbag2, "
                             "e.g. --ros-args -p source:=/data/rugd")
        if not self.rate_hz > 0:
            raise ValueError(f"rate_hz must be > 0, got {self.rate_hz}")
        self.source = FrameSource(g("source"), g("bag_topic") or None)
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)
        self.pub = self.create_publisher(Image, g("topic"), qos)
        self.published = self.skipped = 0
        self.done = self.failed = False
        self._frames = self.source.iterate(self._skip)
        self._pass_frames = 0  # readable frames in the current pass over the source
        self._started = time.monotonic()
        self._timer = self.create_timer(1.0 / self.rate_hz, self._tick)
        self.get_logger().info(
            f"publishing {self.source.description} ({self.source.length} frames) on "
            f"{self.resolve_topic_name(g('topic'))} at {self.rate_hz:g} Hz"
            f"{', looping' if self.loop else ''}{f', {self.count} frames' if self.count else ''}")

    def _skip(self, index: int, which: str, err: Exception) -> None:
        self.skipped += 1
        self.get_logger().warning(f"skipping unreadable frame {index} ({which}) of {self.source.description}: "
                                  f"{err}", throttle_duration_sec=5.0)

    def _next_frame(self):
        """The next readable frame; None at the end of the source, or with loop after a pass without one."""
        item = next(self._frames, None)
        if item is None and self.loop and self._pass_frames:
            self._frames, self._pass_frames = self.source.iterate(self._skip), 0
            item = next(self._frames, None)
        if item is not None:
            self._pass_frames += 1
        return item

    def _finish(self, why: str, failed: bool = False) -> None:
        self.done, self.failed = True, failed
        self._timer.cancel()
        (self.get_logger().error if failed else self.get_logger().info)(
            f"{why}: published {self.published} frames, skipped {self.skipped} unreadable")

    def _tick(self) -> None:
        if self.done:
            return
        if self.published == 0 and self.wait_for_subscribers > 0 and self.pub.get_subscription_count() == 0:
            if time.monotonic() - self._started < self.wait_for_subscribers:
                return
            self.get_logger().warning(f"no subscriber after {self.wait_for_subscribers:g} s: publishing anyway")
            self.wait_for_subscribers = 0.0
        try:
            item = self._next_frame()
        except (OSError, ValueError, ReaderError) as err:  # the bag itself, not one message (those are skipped)
            self._finish(f"cannot read {self.source.description}: {err}", failed=True)
            return
        if item is None:
            if self._pass_frames:
                self._finish("end of source")
            else:  # looping over it would spin for ever without publishing
                self._finish(f"no readable frame in {self.source.description}", failed=True)
            return
        stamp_ns, frame_id, rgb = item.stamp_ns, item.frame_id, item.rgb
        header = Header()
        if self.stamp_source == "bag" and stamp_ns is not None:
            header.stamp = Time(nanoseconds=stamp_ns).to_msg()
        else:
            header.stamp = self.get_clock().now().to_msg()
        header.frame_id = self.frame_id or frame_id or "camera"
        self.pub.publish(image_codec.rgb_to_image(rgb, header))
        self.published += 1
        if self.count and self.published >= self.count:
            self._finish(f"reached count {self.count}")


def _finish(node: ReplayNode) -> int:
    """Reliable subscribers get the last frames only while the writer exists; one whose side of
    discovery finished late (a loaded machine) fetches them only now, so wait for its acks."""
    end = time.monotonic() + ACK_TIMEOUT_S
    while rclpy.ok() and time.monotonic() < end and not node.pub.wait_for_all_acked(Duration(seconds=0.1)):
        pass
    return 1 if node.failed else 0


def run(args: list[str] | None = None, parameter_overrides: list[Parameter] | None = None) -> int:
    return run_node(NODE_NAME, lambda: ReplayNode(parameter_overrides=parameter_overrides or []),
                    lambda node: node.done, fatal=(FileNotFoundError, ValueError, OSError, ReaderError),
                    finish=_finish, args=args)


def main(args: list[str] | None = None) -> int:
    """Console script `replay_node` (parameters via --ros-args -p ...)."""
    return run(args)


def replay_main(argv: list[str] | None = None) -> int:
    """`ros-anomaly-diffusion replay --source PATH [--topic T] [--rate HZ] [--loop] [--count N]`;
    anything after --ros-args goes to ROS (remapping, use_sim_time, ...)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ros_args = []
    if "--ros-args" in argv:
        i = argv.index("--ros-args")
        argv, ros_args = argv[:i], argv[i:]
    ap = argparse.ArgumentParser(prog="ros-anomaly-diffusion replay",
                                 description="Publish a dataset folder or rosbag2 as a sensor_msgs/Image topic.")
    ap.add_argument("--source", required=True, help="RUGD-format folder, image folder, or rosbag2")
    ap.add_argument("--topic", default="/camera/image", help="output topic (default /camera/image)")
    ap.add_argument("--rate", type=float, default=5.0, help="frames per second (default 5)")
    ap.add_argument("--loop", action="store_true", help="start again after the last frame")
    ap.add_argument("--count", type=int, default=0, help="stop after N frames (0: all)")
    ap.add_argument("--frame-id", default="", help="header frame_id (default: the bag's, or camera)")
    ap.add_argument("--stamps", choices=("clock", "bag"), default="clock",
                    help="header stamps from the clock (default) or the bag's recorded stamps")
    ap.add_argument("--bag-topic", default="", help="image topic to read from a bag with several")
    ap.add_argument("--wait-subscribers", type=float, default=0.0, metavar="SEC",
                    help="wait up to SEC seconds for a subscriber before the first frame")
    a = ap.parse_args(argv)
    if not Path(a.source).exists():
        print(f"error: replay source {a.source} does not exist", file=sys.stderr)
        return 2
    overrides = [Parameter("source", value=str(a.source)), Parameter("topic", value=a.topic),
                 Parameter("rate_hz", value=float(a.rate)), Parameter("loop", value=bool(a.loop)),
                 Parameter("count", value=int(a.count)), Parameter("frame_id", value=a.frame_id),
                 Parameter("stamp_source", value=a.stamps), Parameter("bag_topic", value=a.bag_topic),
                 Parameter("wait_for_subscribers", value=float(a.wait_subscribers))]
    return run(["replay"] + ros_args, overrides)


if __name__ == "__main__":
    sys.exit(main())
