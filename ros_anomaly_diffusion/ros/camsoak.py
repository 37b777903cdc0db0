"""`ros-anomaly-diffusion camsoak`: N cameras at once against one detector process serving all of
them (`cameras:=...`, one model) or, with --separate, N detector processes (one each, as
`multi_camera.launch.py one_model:=false` starts them).

This process publishes N camera topics (/camsoak/camK/image_raw, real RUGD frames or random
ones, messages built once) at --rate each and collects every camera's masks. Per camera it
reports the processed rate and the latency from camera stamp to mask (p50, p99), and whether
any mask arrived under another camera's frame_id; for the node processes, their resident
memory summed at start and end of the run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from ..core.procmem import rss_mb
from .processes import spawn, stop
from .soak import camera_header, camera_client, detector_command, frames, publish_at_rate

ROOT = "/camsoak"


def parse(argv):
    p = argparse.ArgumentParser(prog="ros-anomaly-diffusion camsoak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cameras", type=int, default=2, help="number of cameras")
    p.add_argument("--separate", action="store_true", help="one detector process per camera")
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint folder (default: the shipped model)")
    p.add_argument("--variant", default=None, help="variant (default: the one the checkpoint was trained for)")
    p.add_argument("--rate", type=float, default=15.0, help="frames per second of each camera")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of camera input")
    p.add_argument("--data", type=Path, help="frames to publish (default: random 640x480 frames)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="detector parameter")
    p.add_argument("--json", type=Path, help="also write the report here")
    return p.parse_args(argv)


def camsoak_main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    from . import transport

    transport.apply_large_frame_defaults()
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    from .image_codec import rgb_to_image

    names = [f"cam{k}" for k in range(args.cameras)]
    topics = [f"{ROOT}/{n}/image_raw" for n in names]
    groups = [([t], f"{ROOT}/{n}_node") for n, t in zip(names, topics)] if args.separate else [(topics, f"{ROOT}/node")]
    nodes = [spawn(detector_command(args, "-r", f"__ns:={ns}", "-p", f"cameras:={','.join(cams)}"))
             for cams, ns in groups]
    report: dict = {"cameras": args.cameras, "separate": args.separate, "rate_hz": args.rate,
                    "duration_s": args.duration, "detector_processes": len(nodes)}

    def alive() -> bool:
        return all(p.poll() is None for p in nodes)

    try:
        with camera_client("camsoak_cameras") as (client, spin):
            pubs = [client.create_publisher(Image, t, qos_profile_sensor_data) for t in topics]
            masks: dict[str, list[tuple[str, float]]] = {n: [] for n in names}  # (frame_id, latency s)
            for n in names:
                client.create_subscription(Image, f"{ROOT}/{n}/anomaly/mask", lambda m, n=n: masks[n].append(
                    (m.header.frame_id, time.time() - (m.header.stamp.sec + m.header.stamp.nanosec * 1e-9))), 50)
            images = [rgb_to_image(rgb, camera_header(client)) for rgb in frames(args.data)]
            cameras = [(pub, images, n) for pub, n in zip(pubs, names)]
            deadline = time.monotonic() + 180  # every camera answered once: models loaded, graph connected
            while not all(masks.values()) and time.monotonic() < deadline and alive():
                publish_at_rate(client, spin, [(pub, images[:1], n) for pub, _, n in cameras], 2.0, 0.5, alive)
            if not all(masks.values()):
                raise RuntimeError("not every camera got a result within 180 s")
            for box in masks.values():
                box.clear()
            rss_start = sum(rss_mb(p.pid) for p in nodes)
            sent = publish_at_rate(client, spin, cameras, args.rate, args.duration, alive)
            end = time.monotonic() + 3.0  # the last results in flight
            while time.monotonic() < end:
                spin(0.1)
            report.update(frames_in_per_camera=sent, rss_start_mb=rss_start,
                          rss_end_mb=sum(rss_mb(p.pid) for p in nodes))
            per = {}
            for n in names:
                lat = np.array([t for _, t in masks[n]]) * 1000
                per[n] = {"processed": len(lat), "processed_hz": len(lat) / args.duration,
                          "latency_p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
                          "latency_p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
                          "foreign_frames": sum(fid != n for fid, _ in masks[n])}
            report["per_camera"] = per
            report["nodes_alive"] = alive()
    except (KeyboardInterrupt, RuntimeError) as err:
        report["error"] = str(err) or "interrupted"
    finally:
        for p in nodes:
            stop(p, timeout=20)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    bad = "error" in report or not report.get("nodes_alive") or any(
        c["foreign_frames"] or not c["processed"] for c in report["per_camera"].values())
    return 1 if bad else 0
