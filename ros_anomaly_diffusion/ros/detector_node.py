"""ROS 2 node `anomaly_detector`: camera frames in, anomaly mask / score / OOD flag out.

Subscriptions (relative names, remap them):
  image                 sensor_msgs/Image (rgb8, bgr8, rgba8, bgra8, mono8, mono16, 16UC1, 32FC1, 32FC3)
  <image>/compressed    sensor_msgs/CompressedImage (jpeg/png), only with subscribe_compressed:=true;
                        the name follows the resolved image topic (image_transport convention)

Publications (every message carries the input frame's header: stamp and frame_id exactly):
  anomaly/mask          sensor_msgs/Image mono8, 255 = anomalous pixel, 0 = normal
  anomaly/score         sensor_msgs/Image 32FC1, per-pixel anomaly score in [0, 1]
  anomaly/overlay       sensor_msgs/Image rgb8, frame with the anomalies coloured (only computed
                        while it has subscribers and publish_overlay is true)
  anomaly/edited        sensor_msgs/Image rgb8, the frame as edited towards the normal model
                        (editing variants; only while subscribed and publish_edited is true)
  anomaly/ood           std_msgs/Bool, frame-level out-of-distribution flag
  anomaly/ood_score     std_msgs/Float32, frame-level score the flag thresholds
  anomaly/ood_stamped   diagnostic_msgs/DiagnosticArray: the same flag *with the input header*
                        (std_msgs has no stamped Bool): one status, level WARN + message "ood" for an
                        OOD frame, OK + "id" otherwise, values frame_score, frame_threshold,
                        mask_threshold, anomalous_fraction
  /diagnostics          diagnostic_msgs/DiagnosticArray every diagnostics_period s: input and
                        processed rate, latency p50/max (reception to publication), dropped frames,
                        bad inputs per kind, inference errors, frames ignored while disabled,
                        downscaled frames, variant, device, NFE

Service:
  ~/enable              std_srvs/SetBool, the same as setting the `enabled` parameter. false: the
                        worker drops the Detector (del, gc.collect, torch.cuda.empty_cache on CUDA,
                        malloc_trim), so the model's CPU/GPU memory goes back to the system, and
                        frames are ignored (counted as ignored_disabled in /diagnostics); true: the
                        worker loads the model again with the current parameters. The reply comes at
                        once; the log says when the model is released / loaded (a failed load sets
                        `enabled` back to false). Start with `enabled:=false` to start without a model.

QoS: the image subscription defaults to the sensor-data profile with depth 1 (best effort,
volatile, keep last 1), which matches reliable and best-effort publishers alike; set
qos_reliability:=reliable / qos_depth:=N to change it. Outputs are reliable, volatile, keep
last 5 (what RViz and rosbag expect); /diagnostics is reliable, keep last 10.

Threading: the subscription callback only drops the message into a one-slot mailbox (a
newer frame replaces an unprocessed one, which is counted as dropped); a dedicated worker
thread decodes, runs the Detector and publishes. A slow model therefore never builds a
backlog: results always describe the newest frame available when the worker got free.

Very large frames: a frame with more than `max_input_pixels` pixels (default 8 MP) is
downscaled with cv2.INTER_AREA (aspect ratio kept) right after decoding, and everything
downstream, the published mask, score, overlay and edited images included, has the
downscaled resolution; the headers are still the input's. This bounds the node's memory
and the size of what it publishes whatever the camera sends (the model itself always runs
at its own small resolution, so upscaling the outputs again would only cost memory and
bandwidth). The first downscaled frame is logged (input and output sizes), the count is in
/diagnostics as frames_downscaled. Frames smaller than 8x8 pixels are bad input (kind
"frame"): logged, counted, skipped.

Faults: a frame whose inference fails (torch.cuda.OutOfMemoryError included, after which
torch.cuda.empty_cache() is called) is skipped, logged (throttled) and counted as
inference_errors; the next frame is served. device:=cuda without CUDA: with
cuda_fallback:=true the node runs on the CPU after one warning line, with
cuda_fallback:=false it exits with code 1 and a message saying CUDA is not available.

Parameters: one per core Settings field (descriptions and ranges from its metadata) plus the
node-only ones in ros/params.py. Changes are validated with core.settings.check; live
settings (thresholds, steps, guidance, seed, overlay_alpha) apply from the next frame, the
others (variant, checkpoint, device, segments, analysis size, SAM) rebuild the Detector in
the worker thread: on success it is swapped in, on failure the old model keeps running, the
error is logged and the parameters are set back to the running values.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import math
import sys
import threading
import time
from collections import Counter
from dataclasses import fields

import cv2
import numpy as np
import rclpy
import torch
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType, \
    SetParametersResult
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Bool, Float32
from std_srvs.srv import SetBool

from ..core import checkpoint as ckpt
from ..core.detector import Detector
from ..core.settings import Settings, check
from ..core.variants import get_variant
from . import image_codec, transport
from .params import NODE_PARAMETERS, ParamSpec, float_overrides_from_ints, settings_parameters

NODE_NAME = "anomaly_detector"
SETTING_NAMES = tuple(f.name for f in fields(Settings))

_ROS_TYPES = {bool: ParameterType.PARAMETER_BOOL, int: ParameterType.PARAMETER_INTEGER,
              float: ParameterType.PARAMETER_DOUBLE, str: ParameterType.PARAMETER_STRING}


class StartupError(RuntimeError):
    """The node cannot start (bad checkpoint, invalid parameter); message is user-facing."""


def descriptor(p: ParamSpec) -> ParameterDescriptor:
    d = ParameterDescriptor(name=p.name, type=_ROS_TYPES[p.type], description=p.description,
                            read_only=p.read_only)
    if p.choices:
        d.additional_constraints = "one of: " + ", ".join(map(str, p.choices))
    if p.lo is not None and p.type is int:
        d.integer_range = [IntegerRange(from_value=int(p.lo), to_value=int(p.hi), step=0)]
    elif p.lo is not None and p.type is float:
        d.floating_point_range = [FloatingPointRange(from_value=float(p.lo), to_value=float(p.hi), step=0.0)]
    if p.name in ("mask_threshold", "frame_threshold"):
        d.additional_constraints = "-1 (calibrated value from the checkpoint) or a value in [0, 1]"
    return d


class Mailbox:
    """One slot: put() replaces an unconsumed item (counted in `replaced`)."""

    def __init__(self):
        self._cv = threading.Condition()
        self._item = None
        self._closed = False
        self._poked = False
        self.replaced = 0

    def put(self, item) -> None:
        with self._cv:
            if self._item is not None:
                self.replaced += 1
            self._item = item
            self._cv.notify()

    def poke(self) -> None:
        """Wake the consumer without an item (e.g. to apply new parameters)."""
        with self._cv:
            self._poked = True
            self._cv.notify()

    def take(self, timeout: float):
        with self._cv:
            self._cv.wait_for(lambda: self._item is not None or self._closed or self._poked, timeout)
            item, self._item, self._poked = self._item, None, False
            return item

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()


class DetectorNode(Node):
    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        self._specs = {**settings_parameters(), **NODE_PARAMETERS}
        self._declare_all()
        values = {n: self.get_parameter(n).value for n in SETTING_NAMES}
        values = {n: float(v) if self._specs[n].type is float and isinstance(v, int) else v
                  for n, v in values.items()}
        for name in SETTING_NAMES:
            reason = check(name, values[name])
            if reason:
                raise StartupError(f"invalid parameter: {reason}")
        for name, p in NODE_PARAMETERS.items():
            reason = p.check(self.get_parameter(name).value)
            if reason:
                raise StartupError(f"invalid parameter: {reason}")
        self._desired = Settings.from_dict(values)
        self._node_params = {n: self.get_parameter(n).value for n in NODE_PARAMETERS}
        self._lock = threading.Lock()  # guards _desired, _node_params, _stats
        self._detector: Detector | None = None
        self._mailbox = Mailbox()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._bad_loggers: dict[str, object] = {}
        # statistics (under _lock)
        self._received = 0
        self._processed = 0
        self._inference_errors = 0
        self._ignored_disabled = 0
        self._downscaled = 0
        self._downscale_logged = False
        self._bad = Counter()
        self._window_latency: list[float] = []
        self._window_model: list[float] = []
        self._last_diag = (time.monotonic(), 0, 0, 0)
        self._last_input_time: float | None = None

    # ------------------------------------------------------------------ parameters

    def _declare_all(self) -> None:
        # `-p guidance_scale:=1` arrives as an integer: accept it for double parameters.
        float_overrides_from_ints(self, [n for n, p in self._specs.items() if p.type is float])
        for name, p in self._specs.items():
            try:
                self.declare_parameter(name, p.default, descriptor(p))
            except Exception as err:  # InvalidParameterValue/TypeException: out of range, wrong type
                raise StartupError(f"invalid parameter {name}: {err}") from None
        if hasattr(self, "add_pre_set_parameters_callback"):
            self.add_pre_set_parameters_callback(self._coerce_parameters)
        self.add_on_set_parameters_callback(self._on_set_parameters)

    def _coerce_parameters(self, params: list[Parameter]) -> list[Parameter]:
        out = []
        for prm in params:
            spec = self._specs.get(prm.name)
            if spec is not None and spec.type is float and prm.type_ == Parameter.Type.INTEGER:
                prm = Parameter(prm.name, Parameter.Type.DOUBLE, float(prm.value))
            out.append(prm)
        return out

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        changes, node_changes = {}, {}
        for prm in params:
            name, value = prm.name, prm.value
            if name in SETTING_NAMES:
                if self._specs[name].type is float and isinstance(value, int) and not isinstance(value, bool):
                    value = float(value)
                reason = check(name, value)
                if reason:
                    return SetParametersResult(successful=False, reason=reason)
                changes[name] = value
            elif name in NODE_PARAMETERS:
                reason = NODE_PARAMETERS[name].check(value)
                if reason:
                    return SetParametersResult(successful=False, reason=reason)
                node_changes[name] = value
        with self._lock:
            try:
                desired = self._desired.updated(**changes)
            except ValueError as err:
                return SetParametersResult(successful=False, reason=str(err))
            reason = self._quick_reload_check(desired, changes)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
            self._desired = desired
            self._node_params.update(node_changes)
        if changes or "enabled" in node_changes:
            self._mailbox.poke()
        return SetParametersResult(successful=True)

    @staticmethod
    def _quick_reload_check(desired: Settings, changes: dict) -> str | None:
        """Cheap checks of a new checkpoint/variant, so obvious mistakes are rejected at once."""
        if not {"checkpoint", "variant"} & set(changes):
            return None
        try:
            config = ckpt.load_config(desired.checkpoint)
        except ckpt.CheckpointError as err:
            return str(err)
        family = get_variant(desired.variant).family
        if config.get("family") != family:
            return (f"checkpoint {desired.checkpoint} holds a {config.get('family')!r} model, variant "
                    f"{desired.variant!r} needs a {family!r} one")
        return None

    # ------------------------------------------------------------------ start-up

    def load_model(self) -> None:
        s = self._desired
        if not s.checkpoint:
            raise StartupError("parameter 'checkpoint' is empty: pass the checkpoint folder, e.g. "
                               "--ros-args -p checkpoint:=/path/to/checkpoint")
        if not self._node_params["enabled"]:
            reason = self._quick_reload_check(s, {"checkpoint": s.checkpoint})
            if reason:
                raise StartupError(f"cannot load the model: {reason}")
            self.get_logger().info(f"starting disabled (enabled:=false): no model loaded; checkpoint "
                                   f"{s.checkpoint}, variant {s.variant}")
            return
        t0 = time.monotonic()
        try:
            self._detector = Detector(s.checkpoint, s)
        except (ckpt.CheckpointError, ValueError, RuntimeError, OSError) as err:
            raise StartupError(f"cannot load the model: {err}") from None
        self.get_logger().info(
            f"model loaded in {time.monotonic() - t0:.1f} s: variant {s.variant} (NFE {self._detector.nfe}) "
            f"on {self._detector.device}, checkpoint {s.checkpoint}, thresholds mask "
            f"{self._detector.mask_threshold:.3f} frame {self._detector.frame_threshold:.3f}")

    def start(self) -> None:
        """Create the topics, the diagnostics timer and the worker thread."""
        np_ = self._node_params
        in_qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=int(np_["qos_depth"]), durability=DurabilityPolicy.VOLATILE,
            reliability=ReliabilityPolicy.BEST_EFFORT if np_["qos_reliability"] == "best_effort"
            else ReliabilityPolicy.RELIABLE)
        out_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.VOLATILE)
        self._pub_mask = self.create_publisher(Image, "anomaly/mask", out_qos)
        self._pub_score = self.create_publisher(Image, "anomaly/score", out_qos)
        self._pub_overlay = self.create_publisher(Image, "anomaly/overlay", out_qos)
        self._pub_edited = self.create_publisher(Image, "anomaly/edited", out_qos)
        self._pub_ood = self.create_publisher(Bool, "anomaly/ood", out_qos)
        self._pub_ood_score = self.create_publisher(Float32, "anomaly/ood_score", out_qos)
        self._pub_ood_stamped = self.create_publisher(DiagnosticArray, "anomaly/ood_stamped", out_qos)
        self._pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._image_topic = self.resolve_topic_name("image")
        self.create_subscription(Image, "image", self._on_image, in_qos)
        inputs = [self._image_topic]
        if np_["subscribe_compressed"]:
            topic = self._image_topic.rstrip("/") + "/compressed"
            self.create_subscription(CompressedImage, topic, self._on_compressed, in_qos)
            inputs.append(topic)
        self.create_timer(float(np_["diagnostics_period"]), self._publish_diagnostics)
        self.create_service(SetBool, "~/enable", self._on_enable)
        self._worker = threading.Thread(target=self._work, name="anomaly_inference", daemon=True)
        self._worker.start()
        self.get_logger().info(
            f"listening on {', '.join(inputs)} ({np_['qos_reliability']}, depth {np_['qos_depth']}); "
            f"publishing {self.resolve_topic_name('anomaly')}/{{mask,score,overlay,edited,ood,ood_score,"
            f"ood_stamped}}")

    def stop(self) -> None:
        self._stop.set()
        self._mailbox.close()
        if self._worker is not None:
            self._worker.join(timeout=5.0)

    # ------------------------------------------------------------------ callbacks (executor thread)

    def _on_image(self, msg: Image) -> None:
        self._enqueue(msg, image_codec.image_to_rgb)

    def _on_compressed(self, msg: CompressedImage) -> None:
        self._enqueue(msg, image_codec.compressed_to_rgb)

    def _enqueue(self, msg, decode) -> None:
        now = time.monotonic()
        with self._lock:
            self._received += 1
            self._last_input_time = now
            if not self._node_params["enabled"]:
                self._ignored_disabled += 1
                return
        self._mailbox.put((msg, decode, now))

    def _on_enable(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        want = bool(request.data)
        result = self.set_parameters([Parameter("enabled", value=want)])[0]
        response.success = bool(result.successful)
        if not result.successful:
            response.message = f"cannot set enabled={want}: {result.reason}"
        elif want:
            response.message = ("enabled: the model is loaded in the worker thread (the log says when it "
                                "is ready); frames are processed again from then on")
        else:
            response.message = "disabled: the model is released and frames are ignored until enabled"
        return response

    # ------------------------------------------------------------------ worker thread

    def _work(self) -> None:
        while not self._stop.is_set():
            item = self._mailbox.take(timeout=0.2)
            if self._stop.is_set():
                break
            try:
                ready = self._apply_state()
                if item is not None:
                    if ready:
                        self._process(*item)
                    else:
                        with self._lock:
                            self._ignored_disabled += 1
            except Exception as err:  # never let the worker die
                if self._stop.is_set() or not rclpy.ok(context=self.context):
                    break
                self.get_logger().error(f"unexpected error in the inference thread: {type(err).__name__}: {err}",
                                        throttle_duration_sec=5.0)

    def _apply_state(self) -> bool:
        """Bring the model in line with `enabled` and the parameters; True when one is loaded."""
        with self._lock:
            enabled = self._node_params["enabled"]
        if not enabled:
            if self._detector is not None:
                self._release_model()
            return False
        if self._detector is None:
            self._load_in_worker()
            return self._detector is not None
        self._apply_settings()
        return True

    def _release_model(self) -> None:
        det, self._detector = self._detector, None
        on_cuda = det.device.type == "cuda"
        desc = f"{det.settings.variant} on {det.device}"
        del det
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
        _malloc_trim()
        self.get_logger().info(f"disabled: model released ({desc}), frames are ignored until enabled")

    def _load_in_worker(self) -> None:
        with self._lock:
            desired = self._desired
        self.get_logger().info(f"enabled: loading the model (variant {desired.variant}, checkpoint "
                               f"{desired.checkpoint}) ...")
        t0 = time.monotonic()
        try:
            new = Detector(desired.checkpoint, desired)
        except Exception as err:
            self.get_logger().error(f"cannot load the model, staying disabled: {type(err).__name__}: {err}")
            with self._lock:
                self._node_params["enabled"] = False
            self.set_parameters([Parameter("enabled", value=False)])
            return
        self._detector = new
        self.get_logger().info(f"model loaded in {time.monotonic() - t0:.1f} s: variant {desired.variant} "
                               f"(NFE {new.nfe}) on {new.device}; processing frames again")

    def _apply_settings(self) -> None:
        det = self._detector
        with self._lock:
            desired = self._desired
        if desired == det.settings:
            return
        changes = {n: getattr(desired, n) for n in SETTING_NAMES if getattr(desired, n) != getattr(det.settings, n)}
        try:
            reload = det.update(**changes)
        except ValueError as err:
            self.get_logger().error(f"cannot apply {changes}: {err}")
            self._revert(det.settings, changes)
            return
        if not reload:
            self.get_logger().info("applied " + ", ".join(f"{k}={v!r}" for k, v in changes.items()))
            return
        self.get_logger().info(f"rebuilding the model for {', '.join(reload)} ...")
        t0 = time.monotonic()
        try:
            new = Detector(desired.checkpoint, desired)
        except Exception as err:  # keep serving with the old model
            self.get_logger().error(f"model reload failed, keeping the running model "
                                    f"({det.settings.variant} on {det.device}): {type(err).__name__}: {err}")
            self._revert(det.settings, changes)
            return
        self._detector = new
        self.get_logger().info(f"model reloaded in {time.monotonic() - t0:.1f} s: variant {desired.variant} "
                               f"(NFE {new.nfe}) on {new.device}")

    def _revert(self, running: Settings, changes: dict) -> None:
        with self._lock:
            self._desired = running
        self.set_parameters([Parameter(n, value=getattr(running, n)) for n in changes])

    def _bad_input(self, kind: str, err: Exception) -> None:
        with self._lock:
            self._bad[kind] += 1
            count = self._bad[kind]
        # One logger object per kind: rclpy keeps throttle state per logger and call site,
        # so each kind of bad input gets its own throttle window.
        logger = self._bad_loggers.get(kind)
        if logger is None:
            logger = self._bad_loggers[kind] = rclpy.logging.get_logger(self.get_logger().name)
        logger.warning(f"bad input frame on {self._image_topic} ({kind}): {err}; frame skipped "
                       f"({count} {kind} error(s) so far)",
                       throttle_duration_sec=float(self._node_params["bad_input_log_period"]))

    def _limit_size(self, rgb: np.ndarray) -> np.ndarray:
        """Downscale (INTER_AREA, aspect ratio kept) a frame above max_input_pixels."""
        h, w = rgb.shape[:2]
        limit = int(self._node_params["max_input_pixels"])
        if h * w <= limit:
            return rgb
        scale = math.sqrt(limit / (h * w))
        # never below 8 pixels a side (the Detector's minimum) because of the downscaling itself
        nw, nh = max(min(w, 8), int(w * scale)), max(min(h, 8), int(h * scale))
        small = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA)
        with self._lock:
            self._downscaled += 1
            first = not self._downscale_logged
            self._downscale_logged = True
        if first:
            self.get_logger().warning(
                f"frame of {w}x{h} pixels on {self._image_topic} is above max_input_pixels={limit}: "
                f"downscaled to {nw}x{nh}; the outputs have that resolution (same aspect ratio, input "
                f"header). Logged once; the count is frames_downscaled in /diagnostics")
        return small

    def _process(self, msg, decode, received: float) -> None:
        try:
            rgb = self._limit_size(decode(msg))
        except image_codec.FrameError as err:
            self._bad_input(err.kind, err)
            return
        except MemoryError as err:
            self._bad_input("size", MemoryError(f"no memory to decode a {msg.__class__.__name__} of "
                                                f"{len(msg.data)} bytes ({err})"))
            return
        det = self._detector
        try:
            result = det.process(rgb)
        except ValueError as err:  # frame the model cannot take (e.g. too small)
            self._bad_input("frame", err)
            return
        except torch.cuda.OutOfMemoryError as err:
            self._inference_failed(err, det, oom=True)
            return
        except Exception as err:
            self._inference_failed(err, det)
            return
        if self._stop.is_set():
            return
        self._publish(msg.header, rgb, result, det)
        latency = time.monotonic() - received
        with self._lock:
            self._processed += 1
            self._window_latency.append(latency)
            self._window_model.append(result.timings_ms.get("model", float("nan")))

    def _inference_failed(self, err: Exception, det: Detector, oom: bool = False) -> None:
        with self._lock:
            self._inference_errors += 1
            count = self._inference_errors
        if oom or det.device.type == "cuda":
            torch.cuda.empty_cache()  # give the failed attempt's blocks back before the next frame
        what = "CUDA out of memory" if oom else "inference failed"
        self.get_logger().error(f"{what}, frame skipped ({count} inference error(s) so far): "
                                f"{type(err).__name__}: {err}", throttle_duration_sec=5.0)

    def _publish(self, header, rgb: np.ndarray, result, det: Detector) -> None:
        self._pub_mask.publish(image_codec.mask_to_image(result.mask, header))
        self._pub_score.publish(image_codec.score_to_image(result.score, header))
        self._pub_ood.publish(Bool(data=bool(result.is_ood)))
        self._pub_ood_score.publish(Float32(data=float(result.frame_score)))
        status = DiagnosticStatus(
            level=DiagnosticStatus.WARN if result.is_ood else DiagnosticStatus.OK,
            name=f"{self.get_name()}: ood", message="ood" if result.is_ood else "id",
            hardware_id=header.frame_id,
            values=[KeyValue(key="frame_score", value=f"{result.frame_score:.6f}"),
                    KeyValue(key="frame_threshold", value=f"{det.frame_threshold:.6f}"),
                    KeyValue(key="mask_threshold", value=f"{det.mask_threshold:.6f}"),
                    KeyValue(key="anomalous_fraction", value=f"{float(result.mask.mean()):.6f}")])
        self._pub_ood_stamped.publish(DiagnosticArray(header=header, status=[status]))
        if self._node_params["publish_overlay"] and self._pub_overlay.get_subscription_count() > 0:
            from ..core.visualize import overlay

            picture = overlay(rgb, result.score, result.mask, det.settings.overlay_alpha)
            self._pub_overlay.publish(image_codec.rgb_to_image(picture, header))
        if (self._node_params["publish_edited"] and result.edited is not None
                and self._pub_edited.get_subscription_count() > 0):
            self._pub_edited.publish(image_codec.rgb_to_image(result.edited, header))

    # ------------------------------------------------------------------ diagnostics (executor thread)

    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        det = self._detector
        with self._lock:
            t_prev, rec_prev, proc_prev, err_prev = self._last_diag
            received, processed = self._received, self._processed
            lat, model = self._window_latency, self._window_model
            self._window_latency, self._window_model = [], []
            bad = dict(self._bad)
            errors = self._inference_errors
            self._last_diag = (now, received, processed, errors)
            last_input = self._last_input_time
            enabled = bool(self._node_params["enabled"])
            ignored, downscaled = self._ignored_disabled, self._downscaled
            desired = self._desired
        dt = max(now - t_prev, 1e-6)
        dropped = self._mailbox.replaced
        values = {
            "input_rate_hz": f"{(received - rec_prev) / dt:.2f}",
            "processed_rate_hz": f"{(processed - proc_prev) / dt:.2f}",
            "latency_p50_ms": f"{np.median(lat) * 1000:.1f}" if lat else "n/a",
            "latency_max_ms": f"{max(lat) * 1000:.1f}" if lat else "n/a",
            "model_p50_ms": f"{np.nanmedian(model):.1f}" if model else "n/a",
            "frames_received": str(received),
            "frames_processed": str(processed),
            "frames_dropped": str(dropped),
            "inference_errors": str(errors),
            **{f"bad_input_{k}": str(bad.get(k, 0)) for k in ("encoding", "size", "data", "compressed", "frame")},
            "enabled": str(enabled).lower(),
            "model_loaded": str(det is not None).lower(),
            "ignored_disabled": str(ignored),
            "frames_downscaled": str(downscaled),
            "variant": det.settings.variant if det else desired.variant,
            "device": str(det.device) if det else "n/a",
            "nfe": str(det.nfe) if det else "n/a",
            "mask_threshold": f"{det.mask_threshold:.4f}" if det else "n/a",
            "frame_threshold": f"{det.frame_threshold:.4f}" if det else "n/a",
            "checkpoint": det.settings.checkpoint if det else desired.checkpoint,
            "input_topic": self._image_topic,
        }
        if not enabled:
            level, message = DiagnosticStatus.OK, "disabled (model released)"
        elif det is None:
            level, message = DiagnosticStatus.WARN, "loading the model"
        elif errors > err_prev and not lat:
            level, message = DiagnosticStatus.ERROR, "inference failing"
        elif last_input is None or now - last_input > max(5.0, 3 * dt):
            level, message = DiagnosticStatus.WARN, "no input frames"
        elif sum(bad.values()) and not lat:
            level, message = DiagnosticStatus.WARN, "only bad input frames"
        else:
            level, message = DiagnosticStatus.OK, "running"
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        arr.status = [DiagnosticStatus(level=level, name=f"{self.get_name()}: anomaly detection", message=message,
                                       hardware_id=str(det.device) if det else "",
                                       values=[KeyValue(key=k, value=v) for k, v in values.items()])]
        self._pub_diag.publish(arr)


def _malloc_trim() -> None:
    """Hand freed heap memory back to the system (glibc); a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _RosLogHandler(logging.Handler):
    """Python logging of the package (core warnings: CUDA fallback, ...) into the node's ROS log."""

    def __init__(self, logger):
        super().__init__(logging.INFO)
        self._logger = logger

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.levelno >= logging.ERROR:
                self._logger.error(text)
            elif record.levelno >= logging.WARNING:
                self._logger.warning(text)
            else:
                self._logger.info(text)
        except Exception:  # logging must never take the node down
            self.handleError(record)


def bridge_python_logging(node: Node) -> logging.Handler:
    """Route the package's Python log records (INFO and up) to `node`'s ROS logger, once."""
    pkg = logging.getLogger(__name__.split(".")[0])
    handler = _RosLogHandler(node.get_logger())
    pkg.addHandler(handler)
    pkg.setLevel(logging.INFO)
    pkg.propagate = False
    return handler


def main(args=None) -> int:
    dds = transport.apply_large_frame_defaults()
    rclpy.init(args=args)
    node = None
    code = 0
    try:
        node = DetectorNode()
        node.get_logger().info(transport.describe(dds))
        bridge_python_logging(node)
        node.load_model()
        node.start()
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        executor.spin()
    except StartupError as err:
        (node.get_logger() if node else rclpy.logging.get_logger(NODE_NAME)).fatal(str(err))
        code = 1
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.stop()
            node.destroy_node()
        rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
