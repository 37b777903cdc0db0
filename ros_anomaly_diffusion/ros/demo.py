"""`ros-anomaly-diffusion demo`: the whole path on one machine, over real ROS 2 topics.

1. data: a synthetic off-road sequence with known anomalies (or --data, a RUGD folder);
2. model: on the synthetic sequence, trains a small diffusion model (ddim; reused from
   OUT/model next time); with --data, the model shipped with the package (knn on the RUGD
   sample), unless --variant or --retrain asks to train one on that data;
3. graph: `replay` and `detector_node` run as separate processes talking over DDS;
   this process subscribes to the camera and the detector's outputs like any other
   node would, and matches each result to its frame by the input stamp;
4. report: OUT/overlays/*.png, OUT/metrics.json, OUT/sheet.png, a summary on stdout.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..config import variant_params_file
from ..core import checkpoint as ckpt
from ..core.data import open_dataset
from ..core.synthetic import make_synthetic_dataset
from ..engine.evaluation import label_metrics, write_metrics
from ..engine.training import TrainOptions, calibrate, train
from . import transport
from .processes import spawn, stop

NS = "/demo"
SHIPPED_VARIANT = "knn"  # the variant of ckpt.DEFAULT_MODEL (its config.json says so; a test checks)
CAMERA = f"{NS}/camera/image_raw"
# On the synthetic sequence (no --data) every variant trains its family's default network (the
# patch priors). There the pixel edit is compared with the model's own reconstruction of the
# frame rather than with the frame itself, and ddpm keeps the paper's guidance s = 3000 (both chosen
# on a third sequence, `synth --seed 2`, never trained on or reported; docs/results.md). These
# parameters go to calibration and to the node.
SYNTHETIC_PARAMETERS = {"ddim": {"reconstruction_guidance": 1.0},
                        "ddpm": {"reconstruction_guidance": 1.0, "ddpm_guidance_scale": 3000.0}}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ros-anomaly-diffusion demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="RUGD-format folder (default: a generated synthetic sequence)")
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default out/demo)")
    p.add_argument("--variant", default=None, help="variant to train (default: ddim on the synthetic sequence; "
                                                  "with --data, the shipped model, no training)")
    # 800: the pixel patch prior's steps of docs/results.md (68 s on the 2-core AMD EPYC VM)
    p.add_argument("--train-steps", type=int, default=800, help="training steps if no model is in OUT/model")
    p.add_argument("--retrain", action="store_true", help="train even if OUT/model exists")
    p.add_argument("--rate", type=float, default=2.0, help="camera rate in Hz (frames the model cannot keep "
                                                          "up with are dropped, as on a robot)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for every frame's result")
    p.add_argument("--ros-domain", type=int, default=None, help="ROS_DOMAIN_ID for the demo graph")
    return p.parse_args(argv)


def prepare(args) -> tuple[Path, Path]:
    """(training data, replayed data)."""
    if args.data:
        return args.data, args.data
    train_dir, test_dir = args.out / "data" / "train", args.out / "data" / "test"
    if not (test_dir / "images").is_dir():
        print("generating a synthetic off-road sequence with known anomalies ...", flush=True)
        make_synthetic_dataset(train_dir, n_id=32, n_ood=8, seed=0)
        make_synthetic_dataset(test_dir, n_id=6, n_ood=6, seed=1)
    return train_dir, test_dir


def ensure_model(args, train_dir: Path) -> Path:
    if args.data and not args.retrain and args.variant in (None, SHIPPED_VARIANT):
        args.variant = SHIPPED_VARIANT
        print(f"using the model shipped with the package, {ckpt.DEFAULT_MODEL} ({SHIPPED_VARIANT} on the RUGD "
              f"sample; --variant V or --retrain trains one on {args.data})", flush=True)
        return ckpt.DEFAULT_MODEL
    args.variant = args.variant or "ddim"
    model = args.out / "model"
    if (model / ckpt.CONFIG).is_file() and not args.retrain:
        ckpt.load_config(model)
        print(f"using the model in {model} (--retrain to train a new one)", flush=True)
        return model
    print(f"training a small model on the ID pixels of {train_dir} ({args.train_steps} steps) ...", flush=True)
    train(train_dir, model, TrainOptions(variant=args.variant, steps=args.train_steps, save_every=200))
    parameters = node_parameters(args)
    if parameters:  # the held-out frames again, scored as the node will score
        held = set(ckpt.load_config(model)["calibration"][args.variant]["frames"])
        calibrate(model, [f for f in open_dataset(train_dir) if f.name in held], args.variant, **parameters)
    return model


def node_parameters(args) -> dict:
    """What the demo's detector_node gets beside the variant's parameter file: on the synthetic
    sequence, SYNTHETIC_PARAMETERS of its variant."""
    return {} if args.data else SYNTHETIC_PARAMETERS.get(args.variant, {})


class Collector:
    """Subscribes like any client of the detector: camera frames and the outputs."""

    def __init__(self, frames):
        import rclpy
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import Image

        from .image_codec import image_to_rgb

        self.rclpy = rclpy
        self.by_hash = {hashlib.sha1(f.rgb().tobytes()).hexdigest(): f for f in frames}
        self.frame_at: dict[tuple[int, int], object] = {}  # input stamp -> dataset frame
        self.scores: dict[str, np.ndarray] = {}
        self.masks: dict[str, np.ndarray] = {}
        self.node = rclpy.create_node("demo_collector")
        self.decode = image_to_rgb
        self.node.create_subscription(Image, CAMERA, self.on_camera, qos_profile_sensor_data)
        self.node.create_subscription(Image, f"{NS}/anomaly/score", self.on_score, 10)
        self.node.create_subscription(Image, f"{NS}/anomaly/mask", self.on_mask, 10)

    @staticmethod
    def stamp(msg) -> tuple[int, int]:
        return msg.header.stamp.sec, msg.header.stamp.nanosec

    def on_camera(self, msg) -> None:
        frame = self.by_hash.get(hashlib.sha1(self.decode(msg).tobytes()).hexdigest())
        if frame is not None:
            self.frame_at[self.stamp(msg)] = frame

    def _frame(self, msg):
        return self.frame_at.get(self.stamp(msg))

    def on_score(self, msg) -> None:
        frame = self._frame(msg)
        if frame is not None:  # our own node publishes dense 32FC1 rows
            self.scores[frame.name] = np.frombuffer(bytes(msg.data), np.float32).reshape(msg.height, msg.width)

    def on_mask(self, msg) -> None:
        frame = self._frame(msg)
        if frame is not None:
            self.masks[frame.name] = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.width) > 0

    def done(self) -> set[str]:
        return set(self.scores) & set(self.masks)


def report(args, frames, collector, model: Path) -> dict:
    from ..core.analysis import frame_score
    from ..core.visualize import overlay, panel, save_rgb, save_sheet

    done = [f for f in frames if f.name in collector.done()]
    rows, labels, scores, fscores = [], [], [], []
    for f in done:
        rgb, label, score, mask = f.rgb(), f.label(), collector.scores[f.name], collector.masks[f.name]
        save_rgb(overlay(rgb, score, mask), args.out / "overlays" / f"{f.name}.png")
        fs = frame_score(score)
        if label is not None:
            labels.append(label)
            scores.append(score)
            fscores.append(fs)
        rows.append(panel(rgb, score, mask, None, label, f"{f.name}  frame score {fs:.3f}"))
    save_sheet(rows[:12], args.out / "sheet.png")
    metrics = {"frames_replayed": len(frames), "frames_with_results": len(done), "checkpoint": str(model)}
    if labels:
        metrics.update(label_metrics(scores, fscores, labels))
    write_metrics(args.out / "metrics.json", metrics)
    return metrics


def demo_main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    args.out.mkdir(parents=True, exist_ok=True)
    train_dir, test_dir = prepare(args)
    model = ensure_model(args, train_dir)
    frames = list(open_dataset(test_dir))

    transport.apply_large_frame_defaults()  # full-size frames between the three processes
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.ros_domain is not None:
        env["ROS_DOMAIN_ID"] = str(args.ros_domain)
    os.environ.update(env)
    bindir = Path(sys.executable).parent
    detector = spawn([str(bindir / "detector_node"), "--ros-args", "-r", f"__ns:={NS}", "-r", f"image:={CAMERA}",
                      "--params-file", str(variant_params_file(args.variant)),
                      "-p", f"checkpoint:={model.resolve()}", "-p", f"variant:={args.variant}",
                      *(a for k, v in node_parameters(args).items() for a in ("-p", f"{k}:={v}"))],
                     args.out / "logs" / "detector.log", env)
    replay = spawn([str(bindir / "ros-anomaly-diffusion"), "replay", "--source", str(test_dir), "--topic", CAMERA,
                    "--rate", str(args.rate), "--loop", "--wait-subscribers", "60"],
                   args.out / "logs" / "replay.log", env)
    print(f"replay and detector_node started (logs in {args.out / 'logs'}); waiting for results ...", flush=True)

    import rclpy

    rclpy.init()
    collector = Collector(frames)
    code = 0
    try:
        deadline = time.monotonic() + args.timeout
        with tqdm(total=len(frames), desc="frames with results") as bar:
            while len(collector.done()) < len(frames) and time.monotonic() < deadline:
                rclpy.spin_once(collector.node, timeout_sec=0.2)
                bar.update(len(collector.done()) - bar.n)
                for name, proc in (("detector_node", detector), ("replay", replay)):
                    if proc.poll() is not None:
                        raise RuntimeError(f"{name} exited with code {proc.returncode}; see {args.out / 'logs'}")
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    finally:
        stop(replay)
        stop(detector)
        collector.node.destroy_node()
        rclpy.try_shutdown()
    metrics = report(args, frames, collector, model)
    print(json.dumps({k: v for k, v in metrics.items() if k != "checkpoint"}, indent=2))
    print(f"pictures: {args.out / 'sheet.png'} (input, score, overlay, ground truth) and "
          f"{args.out / 'overlays'}/; metrics: {args.out / 'metrics.json'}; node logs: {args.out / 'logs'}")
    if len(collector.done()) < len(frames):
        print(f"warning: only {len(collector.done())} of {len(frames)} frames got a result before the timeout",
              file=sys.stderr)
        code = code or 1
    return code
