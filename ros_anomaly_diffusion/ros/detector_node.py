"""ROS 2 node `anomaly_detector`: camera frames in, anomaly mask / score / OOD flag out.

Subscriptions (relative names, remap them; with cameras:=/front/image_raw,/rear/image_raw one node
serves several cameras with one model: every input below per camera, every output under the
camera's namespace, /front/anomaly/mask, ..., with that camera's headers):
  image                 sensor_msgs/Image (rgb8, bgr8, rgba8, bgra8, mono8, mono16, 16UC1, 32FC1, 32FC3)
  <image>/compressed    sensor_msgs/CompressedImage (jpeg/png), only with subscribe_compressed:=true;
                        the name follows the resolved image topic (image_transport convention)
  camera_info           sensor_msgs/CameraInfo beside the image topic (/cam/image_raw -> /cam/camera_info,
                        image_pipeline's rule) or camera_info_topic; needed for anomaly/points only
  <depth_topic>         sensor_msgs/Image 16UC1 (mm) or 32FC1 (m) aligned with the colour image, only
                        with depth_topic set: anomaly/points back-projected instead of on the ground

Publications (every message carries the input frame's header: stamp and frame_id exactly):
  anomaly/mask          sensor_msgs/Image mono8, 255 = anomalous pixel, 0 = normal
  anomaly/score         sensor_msgs/Image 32FC1, per-pixel anomaly score in [0, 1]
  anomaly/overlay       sensor_msgs/Image rgb8, frame with the anomalies coloured (only computed
                        while it has subscribers and publish_overlay is true)
  anomaly/edited        sensor_msgs/Image rgb8, the frame as edited towards the normal model
                        (editing variants; only while subscribed and publish_edited is true)
  anomaly/ood           std_msgs/Bool, the FILTERED out-of-distribution flag (what a planner acts on):
                        raised when flag_raise_count of the last flag_window frame scores are above
                        frame_threshold, cleared after flag_clear_count consecutive scores at or below
                        frame_threshold - flag_hysteresis (core/temporal.py); restarts on activation
  anomaly/ood_raw       std_msgs/Bool, the per-frame decision frame_score > frame_threshold (unfiltered)
  anomaly/ood_score     std_msgs/Float32, the per-frame score both flags threshold
  anomaly/points        sensor_msgs/PointCloud2 (x, y, z float32) of the anomalous pixels, sampled every
                        point_stride pixels, in target_frame with the input stamp (ros/points.py: ground
                        plane or depth; pose from tf2 or camera_xyz/camera_rpy); only while subscribed
                        (a Nav2 costmap observation source: config/nav2_anomaly_costmap.yaml)
  anomaly/ood_stamped   diagnostic_msgs/DiagnosticArray: the filtered flag *with the input header*
                        (std_msgs has no stamped Bool): one status, level WARN + message "ood" while
                        the filtered flag is raised, OK + "id" otherwise, values frame_score,
                        frame_ood (the raw decision), frame_threshold, mask_threshold,
                        anomalous_fraction
  /diagnostics          diagnostic_msgs/DiagnosticArray every diagnostics_period s: input and
                        processed rate, latency p50/max (reception to publication), dropped frames,
                        bad inputs per kind, inference errors, downscaled frames, variant, backend
                        (what `auto` chose), device, NFE, lifecycle_state; anomaly points: pose source, projection time p50
                        (points_p50_ms), frames without points per reason (points_skipped_*)

Lifecycle (a managed node, rclpy.lifecycle; ~/change_state, ~/get_state as every managed node):
  configure   loads the model and its calibration from the current parameters; a failure (missing
              checkpoint, CUDA absent without fallback, ...) fails the transition, logs the reason
              and leaves the node unconfigured (diagnostics say why)
  activate    subscribes to the image topic and publishes results
  deactivate  unsubscribes and stops publishing; the model stays loaded
  cleanup     releases the model: its CPU/GPU memory goes back to the system
  shutdown    releases everything; the process exits with code 0
With autostart:=true (the default) the node configures and activates itself at start-up, so
`ros2 run` and the launch files work as before; a failed configure then exits with code 1.
Under Nav2's lifecycle_manager start it with autostart:=false and let the manager drive it.
/diagnostics is published in every state (level OK + the state's name while not active).

QoS: the image subscription defaults to the sensor-data profile with depth 1 (best effort,
volatile, keep last 1), which matches reliable and best-effort publishers alike; set
qos_reliability:=reliable / qos_depth:=N to change it. Outputs are reliable, volatile, keep
last 5 (what RViz and rosbag expect); /diagnostics is reliable, keep last 10.

Threading: the subscription callback only hands the message to the runtime (core/runtime.py):
a one-slot mailbox (a newer frame replaces an unprocessed one, which is counted as dropped)
served by a worker thread that decodes, runs the Detector and calls back here to publish. A
slow model therefore never builds a backlog: results always describe the newest frame
available when the worker got free. The model lifecycle, downscaling, statistics and health
rules live there too; this node turns parameters into Settings, messages into frames and
results into messages.

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
node-only ones in ros/params.py. An empty `variant` (the default) is the one the checkpoint was
trained for; the other Settings parameters default to that variant's config/<variant>.yaml, so
`-p checkpoint:=X` alone runs X as its variant's parameter file says. Changes are validated with core.settings.check; live
settings (thresholds, steps, guidance, seed, overlay_alpha) apply from the next frame, the
others (variant, checkpoint, device, segments, analysis size, SAM) rebuild the Detector in
the worker thread: on success it is swapped in, on failure the old model keeps running, the
error is logged and the parameters are set back to the running values.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import SetParametersResult
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecyclePublisher, LifecycleState, TransitionCallbackReturn
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import Bool, Float32

from ..core import checkpoint as ckpt
from ..core.runtime import SETTING_NAMES, STAGES, BadInput, Health, Runtime, Throttle
from ..core.settings import Settings
from . import image_codec, transport
from .cameras import camera_namespaces
from .points import AnomalyPoints, PointsConfig, TfPoses, tf_available
from .params import (MODEL_PARAMETERS, NODE_PARAMETERS, as_declared_type, declare_parameters, settings_parameters,
                     variant_defaults)

NODE_NAME = "anomaly_detector"

_LEVELS = {"ok": DiagnosticStatus.OK, "warn": DiagnosticStatus.WARN, "error": DiagnosticStatus.ERROR}
_BAD_INPUT_KINDS = ("encoding", "size", "data", "compressed", "frame")


# anomaly/<name> outputs, lifecycle publishers: they publish only while the node is active
OUTPUTS = {"mask": Image, "score": Image, "overlay": Image, "edited": Image, "ood": Bool, "ood_raw": Bool,
           "ood_score": Float32, "ood_stamped": DiagnosticArray, "points": PointCloud2}
_POINTS_SKIPS = ("no_camera_info", "camera", "transform", "no_depth", "depth")
_POINTS_LIVE = ("max_range", "point_stride", "ground_z", "depth_tolerance", "camera_xyz", "camera_rpy")


def _beside(image_topic: str) -> str:
    return image_topic.rsplit("/", 1)[0] + "/camera_info"


@dataclass
class Camera:
    """One camera the node serves: its image topic, where its outputs go, its CameraInfo."""
    topic: str  # resolved image topic
    prefix: str  # outputs are <prefix>/<name>: "anomaly" (single camera) or /<camera namespace>/anomaly
    info_topic: str
    outputs: dict[str, LifecyclePublisher] = field(default_factory=dict)
    points: AnomalyPoints | None = None


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


class StartupError(RuntimeError):
    """The node cannot start (bad checkpoint, invalid parameter); message is user-facing."""


def _decoder(msg, decode):
    """The message's decoding, run later in the worker; unreadable frames become BadInput."""
    def run():
        try:
            return decode(msg)
        except image_codec.FrameError as err:
            raise BadInput(err.kind, err) from None
        except MemoryError as err:
            raise BadInput("size", f"no memory to decode a {msg.__class__.__name__} of {len(msg.data)} bytes "
                                   f"({err})") from None
    return run


class DetectorNode(LifecycleNode):
    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        model = {n: settings_parameters()[n] for n in MODEL_PARAMETERS}
        try:
            declare_parameters(self, model.values())
            chosen = {n: self.get_parameter(n).value for n in MODEL_PARAMETERS}
            self._specs = {**settings_parameters(variant_defaults(**chosen)), **NODE_PARAMETERS}
            declare_parameters(self, [p for n, p in self._specs.items() if n not in MODEL_PARAMETERS])
        except ValueError as err:
            raise StartupError(str(err)) from None
        values = {n: self.get_parameter(n).value for n in self._specs}
        for name in NODE_PARAMETERS:
            reason = NODE_PARAMETERS[name].check(values[name])
            if reason:
                raise StartupError(f"invalid parameter: {reason}")
        try:
            settings = Settings.from_dict({n: values[n] for n in SETTING_NAMES})  # core.settings.check
        except ValueError as err:
            raise StartupError(f"invalid parameter: {err}") from None
        self._node_params = {n: values[n] for n in NODE_PARAMETERS}
        try:
            self._cameras = self._camera_list()
        except (RuntimeError, ValueError) as err:
            raise StartupError(f"invalid parameter: {err}") from None
        self._runtime = Runtime(
            settings, max_input_pixels=values["max_input_pixels"], source=", ".join(c.topic for c in self._cameras),
            bad_input_log_period=values["bad_input_log_period"], on_result=self._publish, on_revert=self._revert,
            log=self.get_logger())
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.state = "unconfigured"  # the lifecycle state, as the transitions below leave it
        self._problem = ""  # why the last configure failed (diagnostics)
        self._inputs = []
        self._throttle = Throttle()
        # /diagnostics in every state: a manager or an operator sees why a node is not running
        self._pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(float(values["diagnostics_period"]), self.publish_diagnostics)

    @property
    def runtime(self) -> Runtime:
        """The ROS-free model host behind this node (frames, model lifecycle, statistics)."""
        return self._runtime

    @property
    def autostart(self) -> bool:
        return bool(self._node_params["autostart"])

    # ------------------------------------------------------------------ parameters

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        changes, node_changes = {}, {}
        for prm in params:
            if prm.name not in self._specs:  # rclpy's own, e.g. use_sim_time
                continue
            value = as_declared_type(self._specs[prm.name].default, prm.value)
            if prm.name in NODE_PARAMETERS:
                reason = NODE_PARAMETERS[prm.name].check(value)
                if reason:
                    return SetParametersResult(successful=False, reason=reason)
                node_changes[prm.name] = value
            else:
                changes[prm.name] = value
        reason = self._runtime.change(**changes)  # validated by the core (values, checkpoint family)
        if reason:
            return SetParametersResult(successful=False, reason=reason)
        self._node_params.update(node_changes)
        if "max_input_pixels" in node_changes:
            self._runtime.max_input_pixels = node_changes["max_input_pixels"]
        if set(node_changes) & set(_POINTS_LIVE):
            for cam in self._cameras:
                if cam.points is not None:
                    cam.points.config = self._points_config()
        return SetParametersResult(successful=True)

    def _points_config(self) -> PointsConfig:
        np_ = self._node_params
        return PointsConfig(target_frame=np_["target_frame"], max_range=np_["max_range"],
                            point_stride=np_["point_stride"], ground_z=np_["ground_z"],
                            depth_tolerance=np_["depth_tolerance"], camera_xyz=tuple(np_["camera_xyz"]),
                            camera_rpy=tuple(np_["camera_rpy"]))

    def _make_points(self) -> list[AnomalyPoints]:
        """One AnomalyPoints per camera, sharing one tf2 listener."""
        source = self._node_params["pose_source"]
        if source == "tf" and not tf_available():
            raise StartupError("pose_source is 'tf' but tf2_ros cannot be imported (source your ROS 2 setup); "
                               "use pose_source:=static with camera_xyz / camera_rpy")
        tf = TfPoses(self, self._node_params["target_frame"]) if source != "static" and tf_available() else None
        return [AnomalyPoints(self._points_config(), tf, depth=bool(self._node_params["depth_topic"]))
                for _ in self._cameras]

    def _camera_list(self) -> list[Camera]:
        """The `image` input, or one Camera per `cameras` topic (outputs in its namespace)."""
        np_ = self._node_params
        if not np_["cameras"]:
            topic = self.resolve_topic_name("image")
            info = np_["camera_info_topic"]  # default: camera_info beside the image (image_pipeline's rule)
            return [Camera(topic, "anomaly", self.resolve_topic_name(info) if info else _beside(topic))]
        if np_["camera_info_topic"] or np_["depth_topic"]:
            raise ValueError("camera_info_topic and depth_topic are for a single camera; with cameras, each "
                             "camera's CameraInfo is read beside its image topic and points use the ground plane")
        return [Camera(topic, f"/{ns}/anomaly", _beside(topic)) for topic, ns in camera_namespaces(np_["cameras"])]

    @property
    def camera_info_topic(self) -> str:
        """The (first) camera's CameraInfo topic."""
        return self._cameras[0].info_topic

    def _revert(self, running: Settings, names: list[str]) -> None:
        """The worker could not apply a change: the parameters show the running values again."""
        self.set_parameters([Parameter(n, value=getattr(running, n)) for n in names])

    # ------------------------------------------------------------------ lifecycle (executor thread)

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Load the model (and its calibration) and create the outputs; inactive on success."""
        s = self._runtime.settings
        if not s.checkpoint:
            self.get_logger().info(f"no checkpoint parameter: using the model shipped with the package, "
                                   f"{ckpt.DEFAULT_MODEL} (its MODEL_CARD.md says what it is)")
        try:
            for cam, points in zip(self._cameras, self._make_points()):
                cam.points = points
            self._runtime.load()
        except (StartupError, ckpt.CheckpointError, ValueError, RuntimeError, OSError) as err:
            self._problem = str(err) if isinstance(err, StartupError) else f"cannot load the model: {err}"
            self.get_logger().error(f"configure failed, staying unconfigured: {self._problem}")
            return TransitionCallbackReturn.FAILURE
        self._problem = ""
        out_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.VOLATILE)
        for cam in self._cameras:
            cam.outputs = {name: self.create_lifecycle_publisher(msg_type, f"{cam.prefix}/{name}", out_qos)
                           for name, msg_type in OUTPUTS.items()}
        self.state = "inactive"
        return super().on_configure(state)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Subscribe and serve frames (the lifecycle publishers are enabled by super())."""
        np_ = self._node_params
        in_qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=int(np_["qos_depth"]), durability=DurabilityPolicy.VOLATILE,
            reliability=ReliabilityPolicy.BEST_EFFORT if np_["qos_reliability"] == "best_effort"
            else ReliabilityPolicy.RELIABLE)
        # camera_info and depth: the sensor-data profile matches reliable and best-effort drivers alike
        sensor = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.BEST_EFFORT,
                            durability=DurabilityPolicy.VOLATILE)
        self._inputs, inputs = [], []
        for i, cam in enumerate(self._cameras):
            self._inputs.append(self.create_subscription(Image, cam.topic, self._on_image(i), in_qos))
            inputs.append(cam.topic)
            if np_["subscribe_compressed"]:
                topic = cam.topic.rstrip("/") + "/compressed"
                self._inputs.append(self.create_subscription(CompressedImage, topic, self._on_compressed(i), in_qos))
                inputs.append(topic)
            self._inputs.append(self.create_subscription(CameraInfo, cam.info_topic, cam.points.on_camera_info,
                                                         sensor))
            inputs.append(cam.info_topic)
        if np_["depth_topic"]:  # a single camera (_camera_list)
            self._inputs.append(self.create_subscription(Image, np_["depth_topic"], self._cameras[0].points.on_depth,
                                                         sensor))
            inputs.append(self.resolve_topic_name(np_["depth_topic"]))
        self._runtime.start()
        self.state = "active"
        result = super().on_activate(state)
        self.get_logger().info(
            f"listening on {', '.join(inputs)} ({np_['qos_reliability']}, depth {np_['qos_depth']}); "
            f"publishing {', '.join(self.resolve_topic_name(c.prefix) for c in self._cameras)}/"
            f"{{{','.join(OUTPUTS)}}}")
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop listening and publishing; the model stays loaded."""
        self.state = "inactive"  # first: a frame finishing now is not published
        self._unsubscribe()
        self._runtime.stop()
        self.get_logger().info("deactivated: frames are ignored, the model stays loaded")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Release the model and the outputs."""
        self._release()
        self.state = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self.state == "active":
            self.on_deactivate(state)
        self._release()
        self.state = "finalized"
        self.get_logger().info("shut down")
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        """An exception in a transition: release what there is and go back to unconfigured."""
        self.get_logger().error(f"error in a lifecycle transition from {state.label}: releasing the model")
        self._release()
        self.state = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def _unsubscribe(self) -> None:
        for sub in self._inputs:
            self.destroy_subscription(sub)
        self._inputs = []

    def _release(self) -> None:
        """Inputs, model and outputs: what configure and activate made."""
        self._unsubscribe()
        self._runtime.release()
        for cam in self._cameras:
            for pub in cam.outputs.values():
                self.destroy_lifecycle_publisher(pub)
            cam.outputs, cam.points = {}, None

    def start(self) -> bool:
        """autostart: configure and activate now; False (reason logged) if configure failed."""
        if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            return False
        return self.trigger_activate() == TransitionCallbackReturn.SUCCESS

    def stop(self) -> None:
        """Release everything, whatever the state (process exit)."""
        if self.state != "finalized":
            self._runtime.release()

    @property
    def problem(self) -> str:
        """Why the last configure failed ("" if it did not)."""
        return self._problem

    # ------------------------------------------------------------------ callbacks (executor thread)

    def _on_image(self, camera: int):
        """The image callback of camera `camera`: its frame goes to the runtime as that source."""
        return lambda msg: self._runtime.submit(_decoder(msg, image_codec.image_to_rgb), (camera, msg.header),
                                                source=camera)

    def _on_compressed(self, camera: int):
        return lambda msg: self._runtime.submit(_decoder(msg, image_codec.compressed_to_rgb), (camera, msg.header),
                                                source=camera)

    # ------------------------------------------------------------------ results (worker thread)

    def _publish(self, token, rgb, result, det) -> None:
        if self.state != "active":  # a frame that finished while deactivating
            return
        camera, header = token
        try:
            self._publish_result(self._cameras[camera], header, rgb, result, det)
        except Exception:
            if rclpy.ok(context=self.context):
                raise
            # shutting down (Ctrl-C during inference): nothing left to publish to

    def _publish_result(self, cam: Camera, header, rgb, result, det) -> None:
        out = cam.outputs
        out["mask"].publish(image_codec.mask_to_image(result.mask, header))
        out["score"].publish(image_codec.score_to_image(result.score, header))
        flag = bool(result.ood_filtered)
        out["ood"].publish(Bool(data=flag))
        out["ood_raw"].publish(Bool(data=bool(result.is_ood)))
        out["ood_score"].publish(Float32(data=float(result.frame_score)))
        status = DiagnosticStatus(
            level=DiagnosticStatus.WARN if flag else DiagnosticStatus.OK,
            name=f"{self.get_name()}: ood", message="ood" if flag else "id",
            hardware_id=header.frame_id,
            values=[KeyValue(key="frame_score", value=f"{result.frame_score:.6f}"),
                    KeyValue(key="frame_ood", value=str(bool(result.is_ood)).lower()),
                    KeyValue(key="frame_threshold", value=f"{det.frame_threshold:.6f}"),
                    KeyValue(key="mask_threshold", value=f"{det.mask_threshold:.6f}"),
                    KeyValue(key="anomalous_fraction", value=f"{float(result.mask.mean()):.6f}")])
        out["ood_stamped"].publish(DiagnosticArray(header=header, status=[status]))
        if self._node_params["publish_overlay"] and out["overlay"].get_subscription_count() > 0:
            from ..core.visualize import overlay

            picture = overlay(rgb, result.score, result.mask, det.settings.overlay_alpha)
            out["overlay"].publish(image_codec.rgb_to_image(picture, header))
        if (self._node_params["publish_edited"] and result.edited is not None
                and out["edited"].get_subscription_count() > 0):
            out["edited"].publish(image_codec.rgb_to_image(result.edited, header))
        points = cam.points
        if self._node_params["publish_points"] and points is not None and out["points"].get_subscription_count() > 0:
            mask = result.mask if result.mask_smoothed is None else result.mask_smoothed
            cloud, reason = points.cloud(header, mask)
            if cloud is not None:
                out["points"].publish(cloud)
            elif self._throttle(reason.split(":")[0], 5.0):
                self.get_logger().warning(f"anomaly/points: nothing published for this frame ({reason}); "
                                          f"counted as points_skipped_* in /diagnostics")

    # ------------------------------------------------------------------ diagnostics (executor thread)

    def publish_diagnostics(self) -> None:
        """One /diagnostics message for the statistics window since the previous one."""
        w = self._runtime.window()
        s = w.stats
        det, desired = self._runtime.detector, self._runtime.settings
        values = {
            "input_rate_hz": f"{w.input_rate_hz:.2f}",
            "processed_rate_hz": f"{w.processed_rate_hz:.2f}",
            "latency_p50_ms": _ms(w.latency_p50_ms),
            "latency_max_ms": _ms(w.latency_max_ms),
            "model_p50_ms": _ms(w.model_p50_ms),
            **{f"stage_{k}_p50_ms": _ms(w.stage_p50_ms(k)) for k in STAGES},
            "frames_received": str(s.received),
            "frames_processed": str(s.processed),
            "frames_dropped": str(s.dropped),
            "inference_errors": str(s.inference_errors),
            **{f"bad_input_{k}": str(s.bad_input.get(k, 0)) for k in _BAD_INPUT_KINDS},
            "lifecycle_state": self.state,
            "model_loaded": str(det is not None).lower(),
            "frames_downscaled": str(s.downscaled),
            "variant": det.variant.name if det else desired.variant,
            "backend": det.backend if det else desired.backend,
            "device": str(det.device) if det else "n/a",
            "nfe": str(det.nfe) if det else "n/a",
            "mask_threshold": f"{det.mask_threshold:.4f}" if det else "n/a",
            "frame_threshold": f"{det.frame_threshold:.4f}" if det else "n/a",
            "checkpoint": det.settings.checkpoint if det else desired.checkpoint,
            "input_topic": self._runtime.source,
        }
        pts = [c.points for c in self._cameras if c.points is not None]
        if pts:
            times = [t for p in pts for t in p.take_times()]
            values.update({"points_pose_source": pts[0].pose_source,
                           "points_p50_ms": _ms(float(np.median(times)) if times else None),
                           **{f"points_skipped_{k}": str(sum(p.skipped.get(k, 0) for p in pts))
                              for k in _POINTS_SKIPS}})
        if self.state == "active":
            health = w.health()
        elif self._problem:
            health = Health("error", f"{self.state}: configure failed: {self._problem}")
        else:
            health = Health("ok", self.state)
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        arr.status = [DiagnosticStatus(level=_LEVELS[health.level], name=f"{self.get_name()}: anomaly detection",
                                       message=health.message, hardware_id=str(det.device) if det else "",
                                       values=[KeyValue(key=k, value=v) for k, v in values.items()])]
        self._pub_diag.publish(arr)


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
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        if node.autostart and not node.start():
            raise StartupError(node.problem)
        while rclpy.ok() and node.state != "finalized":  # the shutdown transition ends the process
            executor.spin_once(timeout_sec=0.2)
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
