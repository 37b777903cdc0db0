"""`ros-anomaly-diffusion soak`: drive a detector_node with a fast camera for a while.

The node runs as its own process, as on the robot; this process is the camera (real
RUGD frames, or generated ones, published with the sensor-data QoS at --rate) and a client
of the outputs. Frames are accounted for from both ends: frames_in (published here),
frames_received (counted by the node, from its /diagnostics), lost_in_transport (the
difference: the middleware lost them), dropped_by_design (received but replaced by a newer
frame before the model was free), processed, bad input and inference errors. It also
reports latency percentiles (input stamp to arrival of the mask) and the node's resident
memory at start and end and where a processed frame's time goes inside the node (median over
the /diagnostics windows of decode, resize, network, post, publish), and exits non-zero when
the node died, lost more than --max-loss of the frames in transport, fell behind (see
`backlog_failures`) or grew in memory past --max-growth.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..core.procmem import rss_mb
from ..core.stream_stats import STAGES
from .processes import spawn, stop


def frames(data: Path | None, n: int = 8) -> list[np.ndarray]:
    if data is not None:
        from ..core.data import open_dataset

        return [f.rgb() for f in list(open_dataset(data))[:n]]
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(n)]


def detector_command(args, *ros_args: str) -> list[str]:
    """detector_node's command line for a soak: the parameter file of args.variant (none: the
    one the checkpoint was trained for), args.checkpoint (none: the shipped model), args.set
    values, then `ros_args`."""
    from ..config import checkpoint_variant, variant_params_file

    variant = args.variant or checkpoint_variant(args.checkpoint or "")
    checkpoint = ["-p", f"checkpoint:={args.checkpoint.resolve()}"] if args.checkpoint else []
    params = [a for kv in args.set for a in ("-p", kv.replace("=", ":=", 1))]
    return [str(Path(sys.executable).parent / "detector_node"), "--ros-args", *ros_args,
            "--params-file", str(variant_params_file(variant)), *checkpoint, "-p", f"variant:={variant}", *params]


@contextmanager
def camera_client(name: str):
    """(node, spin(seconds)) in an rclpy context of its own (callers, tests and tools, may have
    initialised rclpy already); shut down on exit."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    context = rclpy.Context()
    rclpy.init(context=context)
    client = rclpy.create_node(name, context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(client)
    try:
        yield client, lambda seconds: executor.spin_once(timeout_sec=seconds)
    finally:
        executor.shutdown()
        client.destroy_node()
        rclpy.try_shutdown(context=context)


def publish_at_rate(client, spin, cameras, rate: float, duration: float, alive) -> int:
    """Publish each camera's prebuilt messages in turn, `rate` rounds a second for `duration`
    seconds (while alive()), each with a fresh header (frame_id: the camera's, or the
    default); spin between rounds. cameras: [(publisher, messages, frame_id or None)].
    Returns the rounds published."""
    sent, period, start = 0, 1.0 / rate, time.monotonic()
    next_t = start
    while time.monotonic() - start < duration and alive():
        for pub, messages, frame_id in cameras:
            msg = messages[sent % len(messages)]
            msg.header = camera_header(client)
            if frame_id:
                msg.header.frame_id = frame_id
            pub.publish(msg)
        sent += 1
        next_t += period
        while time.monotonic() < next_t:
            spin(max(0.0, next_t - time.monotonic()))
    return sent


def parse(argv):
    p = argparse.ArgumentParser(prog="ros-anomaly-diffusion soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint folder (default: the shipped model)")
    p.add_argument("--variant", default=None, help="variant (default: the one the checkpoint was trained for)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of camera input")
    p.add_argument("--rate", type=float, default=30.0, help="camera rate in Hz")
    p.add_argument("--data", type=Path, help="frames to publish (default: random 640x480 frames)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="detector parameter, e.g. --set steps=10 (repeatable)")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds before the clock starts (model load)")
    p.add_argument("--max-latency", type=float, default=0.0,
                   help="fail if p99 latency exceeds this many seconds (0: 2.5 x the median inference "
                        "time the node reports + 0.5 s: a newest-frame-only node is never further behind)")
    p.add_argument("--max-latency-growth", type=float, default=0.5,
                   help="fail if the median latency of the last quarter of the run exceeds that of the "
                        "first quarter by more than this many seconds (a queue building up)")
    p.add_argument("--max-loss", type=float, default=0.01,
                   help="fail if more than this fraction of the frames never reached the node")
    p.add_argument("--max-growth", type=float, default=0.10, help="fail if RSS grows by more than this fraction")
    p.add_argument("--json", type=Path, help="also write the report here")
    return p.parse_args(argv)


def soak_main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    from . import transport

    transport.apply_large_frame_defaults()  # this camera and the node: full-size frames over best effort
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    from .image_codec import rgb_to_image

    node = spawn(detector_command(args, "-r", "image:=/soak/image", "-r", "__ns:=/soak", "-p",
                                  "diagnostics_period:=1.0"))
    report = {}
    arrivals = latencies = np.zeros(0)
    try:
        with camera_client("soak_camera") as (client, spin):
            pub = client.create_publisher(Image, "/soak/image", qos_profile_sensor_data)
            results: list[tuple[float, float]] = []  # (arrival, latency) per mask
            client.create_subscription(Image, "/soak/anomaly/mask", lambda m: results.append(
                (time.monotonic(), time.time() - (m.header.stamp.sec + m.header.stamp.nanosec * 1e-9))), 10)
            diagnostics = NodeCounters()
            client.create_subscription(DiagnosticArray, "/diagnostics", diagnostics.on_message, 10)
            # Messages built once: the camera must not be the bottleneck it measures (a 1.1 MB
            # frame takes milliseconds to convert); each publish only stamps a header.
            messages = [rgb_to_image(rgb, camera_header(client)) for rgb in frames(args.data)]
            # Wait for the node to load its model and answer a first frame.
            deadline = time.monotonic() + 120
            while not results and time.monotonic() < deadline and node.poll() is None:
                messages[0].header = camera_header(client)
                pub.publish(messages[0])
                spin(0.5)
            if not results:
                raise RuntimeError("the detector produced no result within 120 s")
            end_warm = time.monotonic() + args.warmup
            while time.monotonic() < end_warm:
                spin(0.1)
            before = diagnostics.settled(spin, timeout=30.0)
            results.clear()
            diagnostics.clear()
            rss_start = rss_mb(node.pid)
            start = time.monotonic()
            sent = publish_at_rate(client, spin, [(pub, messages, None)], args.rate, args.duration,
                                   lambda: node.poll() is None)
            after = diagnostics.settled(spin, timeout=30.0)
            rss_end = rss_mb(node.pid)
            arrivals, latencies = _series(results, start)
            report = _report(args, sent, arrivals, latencies, before, after, diagnostics.model_ms, rss_start,
                             rss_end)
            report["node_stages_p50_ms"] = {k: round(float(np.nanmedian(v)), 2) if v else None
                                            for k, v in diagnostics.stages_ms.items()}
            report["node_alive"] = node.poll() is None
    except (KeyboardInterrupt, RuntimeError) as err:
        report["error"] = str(err) or "interrupted"
    finally:
        out = stop(node, timeout=20)
        report["node_exit_code"] = node.returncode
        report["node_traceback"] = "Traceback" in out
    failures = _judge(report, args, arrivals, latencies)
    report["failures"] = failures
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 1 if failures else 0


# Frames the node received and has finished with, one way or another (its /diagnostics keys).
OUTCOMES = ("frames_processed", "frames_dropped", "inference_errors",
            "bad_input_encoding", "bad_input_size", "bad_input_data", "bad_input_compressed", "bad_input_frame")


class NodeCounters:
    """The detector's counters from its /diagnostics status, and its inference times."""

    def __init__(self):
        self.latest: dict[str, str] | None = None
        self.seen = 0
        self.model_ms: list[float] = []
        self.stages_ms: dict[str, list[float]] = {k: [] for k in STAGES}  # per-window p50s

    def on_message(self, msg) -> None:
        for status in msg.status:
            if status.name.endswith(": anomaly detection"):
                self.latest = {kv.key: kv.value for kv in status.values}
                self.seen += 1
                for key, box in (("model_p50_ms", self.model_ms),
                                 *((f"stage_{k}_p50_ms", self.stages_ms[k]) for k in STAGES)):
                    try:
                        box.append(float(self.latest.get(key, "nan")))
                    except ValueError:  # "n/a": no frame in that window
                        pass

    def clear(self) -> None:
        """Forget the per-window figures (the warm-up's)."""
        self.model_ms.clear()
        for box in self.stages_ms.values():
            box.clear()

    def settled(self, spin, timeout: float) -> dict[str, int]:
        """Counters from a status published after this call, once every received frame has an
        outcome (none waiting for or in the model)."""
        seen, deadline = self.seen, time.monotonic() + timeout
        while time.monotonic() < deadline:
            spin(0.1)
            if self.seen > seen and self.latest is not None:
                counts = {k: int(self.latest.get(k, 0)) for k in ("frames_received", *OUTCOMES)}
                if counts["frames_received"] == sum(counts[k] for k in OUTCOMES):
                    return counts
                seen = self.seen
        raise RuntimeError(f"the node's /diagnostics counters did not settle within {timeout:g} s "
                           f"(last: {self.latest})")


def _series(results: list[tuple[float, float]], start: float) -> tuple[np.ndarray, np.ndarray]:
    """(arrival time since the run began, latency) of each mask, as arrays."""
    if not results:
        return np.zeros(0), np.array([np.nan])
    return np.array([t - start for t, _ in results]), np.array([lat for _, lat in results])


def _report(args, sent: int, arrivals: np.ndarray, lat: np.ndarray, before: dict, after: dict,
            model_ms: list[float], rss_start: float, rss_end: float) -> dict:
    delta = {k: after[k] - before[k] for k in after}
    bad = sum(v for k, v in delta.items() if k.startswith("bad_input_"))
    return {"duration_s": args.duration, "rate_hz": args.rate, "frames_in": sent,
            "frames_received": delta["frames_received"], "lost_in_transport": sent - delta["frames_received"],
            "dropped_by_design": delta["frames_dropped"], "frames_processed": delta["frames_processed"],
            "results_received": len(arrivals), "bad_input": bad, "inference_errors": delta["inference_errors"],
            "latency_p50_ms": float(np.percentile(lat, 50) * 1000),
            "latency_p99_ms": float(np.percentile(lat, 99) * 1000),
            "latency_max_ms": float(np.max(lat) * 1000),
            "model_p50_ms": float(np.median(model_ms)) if model_ms else float("nan"),
            "rss_start_mb": rss_start, "rss_end_mb": rss_end}


def backlog_failures(arrivals: np.ndarray, latencies: np.ndarray, max_latency: float,
                     max_growth: float) -> list[str]:
    """A backlog is results getting older: p99 latency over `max_latency` seconds, or the
    median latency of the last quarter of the run (by arrival) above that of the first
    quarter by more than `max_growth` seconds. Either alone catches what the other can miss:
    a steadily growing queue can stay under a generous bound for a short run, and a queue
    that filled before the run began no longer grows."""
    fails = []
    p99 = float(np.percentile(latencies, 99))
    if p99 > max_latency:
        fails.append(f"p99 latency {p99 * 1000:.0f} ms exceeds {max_latency * 1000:.0f} ms: a backlog")
    if len(latencies) >= 8:
        order = np.argsort(arrivals)
        quarter = len(order) // 4
        first = float(np.median(latencies[order[:quarter]]))
        last = float(np.median(latencies[order[-quarter:]]))
        if last - first > max_growth:
            fails.append(f"latency grew from {first * 1000:.0f} ms (first quarter) to {last * 1000:.0f} ms "
                         f"(last quarter): a queue is building up")
    return fails


def _judge(r: dict, args, arrivals: np.ndarray, latencies: np.ndarray) -> list[str]:
    if "error" in r:
        return [r["error"]]
    fails = []
    if not r["node_alive"]:
        fails.append("the node died during the soak")
    if r["frames_processed"] == 0:
        fails.append("no frame was processed")
    if r["frames_in"] and r["lost_in_transport"] > args.max_loss * r["frames_in"]:
        fails.append(f"{r['lost_in_transport']} of {r['frames_in']} frames never reached the node "
                     f"(lost in transport; allowed {args.max_loss:.0%})")
    if r["frames_processed"]:
        limit = args.max_latency or 2.5 * r["model_p50_ms"] / 1000 + 0.5
        fails += backlog_failures(arrivals, latencies, limit, args.max_latency_growth)
    if r["rss_end_mb"] > r["rss_start_mb"] * (1 + args.max_growth):
        fails.append(f"RSS grew from {r['rss_start_mb']:.0f} to {r['rss_end_mb']:.0f} MB")
    if r["node_traceback"]:
        fails.append("the node printed a traceback")
    return fails


def camera_header(node):
    from std_msgs.msg import Header

    h = Header()
    h.stamp = node.get_clock().now().to_msg()
    h.frame_id = "soak_camera"
    return h
