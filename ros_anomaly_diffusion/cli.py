"""`ros-anomaly-diffusion` command line: train, eval, detect, calibrate, synth, bench, replay, bag, demo,
soak, camsoak."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields
from pathlib import Path


from .config import parse_assignments, variant_settings

# Each command imports what it runs (torch and diffusers, rclpy for the ROS commands) inside
# its function: `--help` starts at once and a command pays only for its own imports.


def _settings(args):
    """The variant's config/<variant>.yaml, then --set overrides, then the checkpoint."""
    overrides = parse_assignments(args.set or [], "--set")
    checkpoint = str(args.checkpoint) if args.checkpoint else ""  # empty: the shipped model
    return variant_settings(args.variant, checkpoint=checkpoint, device=args.device, **overrides)


def _common_run(p: argparse.ArgumentParser, variant_default: str = "") -> None:
    p.add_argument("--variant", default=variant_default,
                   help="variant name (config/<variant>.yaml supplies its settings); default: " + (
                       variant_default or "the one the checkpoint was trained for"))
    p.add_argument("--device", default=None, help="torch device (default: the variant's config)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one setting, e.g. --set steps=50 (repeatable)")
    p.add_argument("--frames", default="all", choices=["all", "id", "ood"], help="which labelled frames to use")
    p.add_argument("--scenes", default="all", choices=["all", "train", "val", "test"],
                   help="RUGD reference scene split")


def add_train_options(p: argparse.ArgumentParser) -> None:
    """One option per TrainOptions field (--image-size for image_size), its help, range and
    default read from the field."""
    from .core.families.fitting import TrainOptions

    defaults = TrainOptions()
    for f in fields(TrainOptions):
        meta, default, flag = f.metadata, getattr(defaults, f.name), "--" + f.name.replace("_", "-")
        shown = f" (default: {default})" if default not in (None, "") and f.name != "schedule" else ""
        kwargs = dict(help=meta["help"] + shown, metavar=meta["metavar"])
        if f.name == "image_size":
            kwargs.update(type=int, nargs=2, default=None)
        elif f.name == "schedule":
            kwargs.update(action="append", default=[])
        else:
            kwargs.update(type=type(default), default=default, choices=meta["choices"])
        p.add_argument(flag, **kwargs)


def train_options(args) -> "TrainOptions":  # noqa: F821 (imported in the function: --help stays fast)
    from .core.families.fitting import TrainOptions
    from .core.samplers import ScheduleConfig

    values = {f.name: getattr(args, f.name) for f in fields(TrainOptions)}
    schedule = parse_assignments(args.schedule, "--schedule")
    unknown = set(schedule) - {f.name for f in fields(ScheduleConfig)}
    if unknown:
        raise ValueError(f"--schedule: unknown {sorted(unknown)}; keys: {[f.name for f in fields(ScheduleConfig)]}")
    values["schedule"] = ScheduleConfig(**schedule)
    return TrainOptions(**values)


def cmd_train(args) -> None:
    from .engine.training import train
    from .ros import bag

    opts = train_options(args)
    data = bag.bag_frames(args.data, args.topic) if bag.is_bag(args.data) else args.data
    out = train(data, args.out, opts, progress=not args.quiet)
    from accelerate import PartialState

    if PartialState().is_main_process:  # one line, however many processes trained
        print(f"checkpoint written to {out}")


def cmd_eval(args) -> None:
    from .core.data import open_dataset
    from .core.detector import Detector
    from .core.splits import select
    from .engine.evaluation import evaluate

    det = Detector(args.checkpoint, _settings(args))
    metrics = evaluate(det, select(open_dataset(args.data), args.frames, args.scenes), args.out,
                       progress=not args.quiet)
    keys = ("pixel_ap", "pixel_auroc", "fpr95", "f_star", "f1_smiyc", "frame_auroc", "latency_ms", "nfe")
    print(json.dumps({k: metrics[k] for k in keys}, indent=2))
    print(f"metrics, overlays and sheet.png written to {args.out}")


def cmd_calibrate(args) -> None:
    from .core.data import open_dataset
    from .core.splits import select
    from .engine.training import calibrate

    frames = select(open_dataset(args.data), "id" if args.frames == "all" else args.frames, args.scenes)
    result = calibrate(args.checkpoint, frames, args.variant, args.mask_fpr, args.frame_fpr,
                       args.device or "cpu", progress=not args.quiet)
    print(json.dumps({k: result[k] for k in ("mask_threshold", "frame_threshold")}, indent=2))


def cmd_synth(args) -> None:
    from .core.synthetic import make_synthetic_dataset

    print(make_synthetic_dataset(args.out, n_id=args.n_id, n_ood=args.n_ood, size=tuple(args.size),
                                 seed=args.seed))


def cmd_bench(args) -> None:
    from .core.families.fitting import TrainOptions
    from .engine.bench import bench, bench_folds, recorded_rows, train_all

    size = tuple(args.train_size) if args.train_size else None  # None: each family's default
    TrainOptions(calib_fraction=args.calib_fraction)  # train's range: refused before any family trains
    if not args.variants:
        if args.train or args.folds:
            raise ValueError("--train and --folds need the rows to train: --variants ROW [ROW ...]")
        args.variants = recorded_rows(args.checkpoints)
    if args.folds:
        if args.folds < 2:
            raise ValueError(f"--folds needs K >= 2, got {args.folds}")
        if not args.train or args.train_data:
            raise ValueError("--folds trains on the other folds of --data: it needs --train and no --train-data")
        bench_folds(str(args.data), str(args.checkpoints), args.variants, str(args.out), args.folds, args.seed,
                    args.frames, args.device or "cpu", args.max_frames, args.train_steps, args.train_frames or "all",
                    size, args.train_preset, calib_fraction=args.calib_fraction)
    else:
        if args.train:
            train_all(str(args.train_data or args.data), args.checkpoints, args.variants, args.train_steps,
                      args.device or "cpu", args.train_frames or "id", size, args.train_preset, args.seed,
                      calib_fraction=args.calib_fraction)
        bench(str(args.data), str(args.checkpoints), args.variants, str(args.out), args.frames,
              args.device or "cpu", args.max_frames)
    print((args.out / "results.md").read_text())
    print(f"results.csv, results.md and ap_vs_latency.png written to {args.out}")


def cmd_quantize(args) -> None:
    from .engine.quantize import quantize_checkpoint

    before = args.checkpoint / "denoiser.safetensors"
    out = quantize_checkpoint(args.checkpoint, args.out, args.precision, args.layers)
    after = out / "denoiser.safetensors"
    a, b = before.stat().st_size, after.stat().st_size
    print(f"denoiser.safetensors: {a / 1e6:.2f} MB -> {b / 1e6:.2f} MB ({args.precision}, {args.layers} layers), "
          f"ratio {b / a:.3f}")
    print(f"quantized checkpoint written to {out}")


def cmd_export(args) -> None:
    from .core.detector import Detector
    from .engine.export import TRT_OPSET, export_frame_graph, export_onnx, trtexec_command

    args.set = (args.set or []) + ["segments=none", "backend=torch", "precision=fp32"]  # torch modules to export
    det = Detector(args.checkpoint, _settings(args))
    variant = det.variant.name
    dynamic = args.dynamic_batch is not None
    batch = args.dynamic_batch if dynamic else args.batch  # dynamic: the largest, for trtexec's profile
    if batch < 1:
        raise ValueError(f"{'--dynamic-batch MAX' if dynamic else '--batch'} must be >= 1, got {batch}")
    options = {"opset": args.opset or TRT_OPSET, "dynamic_batch": dynamic, "precision": args.precision}
    target = det.scorer.export_target(det.model_size)
    export = export_frame_graph if target.kind == "frame" else export_onnx  # frame: backbone, model and maps
    exported = export(target.module, (batch, *target.item_shape), args.out / f"{variant}_{target.kind}.onnx",
                      **options)
    print(exported.summary())
    print("build the TensorRT engine on the robot (an engine is specific to its GPU and TensorRT version):")
    print(f"  {trtexec_command(exported, batch)}")


def cmd_detect(args) -> None:
    from .core.detector import Detector
    from .engine.detect import detect
    from .ros.sources import FrameSource

    source = FrameSource(args.source, args.bag_topic)
    settings = _settings(args)
    det = Detector(settings.checkpoint, settings)
    log = logging.getLogger("ros_anomaly_diffusion")

    def skip(index, which, err):
        log.warning("skipping unreadable frame %d (%s) of %s: %s", index, which, source.description, err)

    frames = ((f.name, f.rgb) for f in source.iterate(skip))
    summary = detect(det, frames, args.out, total=source.length or None, progress=not args.quiet)
    for reason in summary["skipped"]:
        log.warning("skipped (the detector refused it): %s", reason)
    print(f"{summary['frames']} frames of {source.description} with variant {det.variant.name} "
          f"({det.directory}): {summary['ood_frames']} flagged per frame, {summary['ood_filtered_frames']} by the "
          f"filtered flag; overlays/, masks/, scores/ and frames.csv written to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    from .core.families.fitting import TrainOptions  # add_train_options imports it too: no extra start-up

    parser = argparse.ArgumentParser(prog="ros-anomaly-diffusion", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a variant's model on ID pixels and calibrate its thresholds",
                       description="Train under Hugging Face accelerate: one process here; several with "
                                   "`accelerate launch [--cpu] --num_processes N -m ros_anomaly_diffusion train ...` "
                                   "(each process reads its own shard of the frames; --batch-size is per process).")
    p.add_argument("--data", required=True, type=Path,
                   help="RUGD-format folder, plain image folder, or rosbag2 (its image topic; see --topic)")
    p.add_argument("--topic", default=None, help="rosbag2 --data: the image topic (default: its only one)")
    p.add_argument("--out", required=True, type=Path, help="checkpoint folder (resumed if it holds train_state/)")
    add_train_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="metrics.json, overlays and a picture sheet on labelled frames")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    _common_run(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("calibrate", help="set a variant's thresholds from ID frames")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--checkpoint", required=True, type=Path)
    _common_run(p)
    p.add_argument("--mask-fpr", type=float, default=0.01)
    p.add_argument("--frame-fpr", type=float, default=0.05)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("synth", help="write a synthetic off-road scene sequence in RUGD format")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--n-id", type=int, default=24)
    p.add_argument("--n-ood", type=int, default=8)
    p.add_argument("--size", type=int, nargs=2, default=(176, 216), metavar=("H", "W"))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("bench", help="every listed variant on the same frames: results.csv / results.md / plot")
    p.add_argument("--data", required=True, type=Path, help="labelled frames to evaluate on")
    p.add_argument("--checkpoints", required=True, type=Path, help="CKPT_ROOT with one folder per model family")
    p.add_argument("--variants", nargs="+", metavar="ROW",
                   help="rows: a variant name with optional overrides, e.g. ddim ddim:steps=10 ddim:quantization=int8; "
                        "default: each checkpoint in CKPT_ROOT as the variant it was trained for")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--frames", default="all", choices=["all", "id", "ood"])
    p.add_argument("--device", default=None)
    p.add_argument("--max-frames", type=int, default=0,
                   help="evaluate at most N frames (0: all; with --folds: of each fold)")
    p.add_argument("--train", action="store_true", help="first train every family the rows need")
    p.add_argument("--train-data", type=Path, help="training frames for --train (default: --data; ID pixels only)")
    p.add_argument("--train-frames", default=None, choices=["all", "id"],
                   help="training frames for --train: id (frames without OOD objects; the default) or all "
                        "(OOD pixels masked out of the loss; the default with --folds)")
    p.add_argument("--folds", type=int, default=0, metavar="K",
                   help="with --train: K-fold cross-validation over --data; each fold is scored by models "
                        "trained and calibrated on the other folds only (CKPT_ROOT/fold<i>), metrics pooled")
    p.add_argument("--seed", type=int, default=0, help="seed of the fold assignment and of training")
    p.add_argument("--train-steps", type=int, default=3000)
    p.add_argument("--train-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="--train: the size the models see (as train --image-size; default: each family's)")
    p.add_argument("--train-preset", default="small", help="--train: network width (as train --preset)")
    p.add_argument("--calib-fraction", type=float, default=TrainOptions().calib_fraction,
                   help="--train: share of the ID training frames held out to calibrate the thresholds on "
                        "(as train --calib-fraction; default: %(default)s)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("quantize", help="write a copy of a checkpoint with its denoiser quantized (fp16 or int8)")
    p.add_argument("--checkpoint", required=True, type=Path, help="float checkpoint folder")
    p.add_argument("--out", required=True, type=Path, help="new checkpoint folder")
    p.add_argument("--precision", required=True, choices=["int8", "fp16"])
    p.add_argument("--layers", default="selected", choices=["selected", "all"],
                   help="selected: attention projections and ResNet convs; all: every Conv2d and Linear")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("export", help="write what a variant runs as ONNX for TensorRT's trtexec (Jetson): the "
                                      "whole frame graph of knn, inversion and feature_edit (<variant>_frame.onnx), "
                                      "the denoiser of the others (<variant>_denoiser.onnx); prints the trtexec "
                                      "command")
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint folder (default: the shipped model)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    _common_run(p)
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, default=1, metavar="N",
                       help="fixed batch size of the graph (default: %(default)s; a multi-camera node batches "
                            "its cameras)")
    batch.add_argument("--dynamic-batch", type=int, nargs="?", const=4, default=None, metavar="MAX",
                       help="leave the batch dimension free; TensorRT then needs an optimisation profile, "
                            "trtexec --minShapes=x:1x3xHxW --optShapes=x:MAXx3xHxW --maxShapes=x:MAXx3xHxW "
                            "(and t:1 / t:MAX for a denoiser), printed with MAX (default 4: the batch the "
                            "engine is tuned for and the largest it takes)")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                   help="fp32 (default): the recommended route for TensorRT 8.x/10.x (JetPack 5/6), "
                        "`trtexec --fp16` builds an fp16 engine from the fp32 graph, choosing per layer; "
                        "fp16: the graph itself in half precision (weights, inputs, outputs; the score "
                        "arithmetic of a frame graph stays fp32) for runtimes that take an fp16 graph, "
                        "e.g. TensorRT strongly typed (trtexec --stronglyTyped; TensorRT 11 has no --fp16)")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (default: 17, the highest that TensorRT 8.5/8.6 of JetPack 5.1/6.0 parses; "
                        "TensorRT 10.x parses up to 20)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("detect", help="run a model on unlabelled frames (image folder, rosbag2 or video): "
                                      "overlays, masks, score maps and frames.csv")
    p.add_argument("--source", required=True, type=Path, help="image folder, rosbag2 or video file")
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint folder (default: the shipped model)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--bag-topic", default=None, help="image topic of a bag with several")
    _common_run(p)
    p.set_defaults(func=cmd_detect)

    # The ROS commands parse their own arguments (they run as nodes too).
    for name, help_ in (("replay", "publish a folder or rosbag2 as a camera topic"),
                        ("bag", "convert an image folder into a rosbag2"),
                        ("demo", "end-to-end demo over real ROS 2 topics"),
                        ("soak", "drive a detector_node with a fast camera; report drops, latency, memory"),
                        ("camsoak", "N cameras against one multi-camera detector (or N detectors): rates, "
                                    "latency, memory")):
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] in ("replay", "bag", "demo", "soak", "camsoak"):
        if argv[0] == "replay":
            from .ros.replay_node import replay_main as run
        elif argv[0] == "bag":
            from .ros.bag import bag_main as run
        elif argv[0] == "soak":
            from .ros.soak import soak_main as run
        elif argv[0] == "camsoak":
            from .ros.camsoak import camsoak_main as run
        else:
            from .ros.demo import demo_main as run
        return run(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        logging.getLogger("ros_anomaly_diffusion").error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
