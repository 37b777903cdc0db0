"""ROS 2 node `anomaly_detector`: camera frames in, anomaly mask / score / OOD flag out.

Its topics, lifecycle, QoS, threading, fault handling and parameters: docs/node.md. It only
adapts: parameters to Settings (params.py), messages to frames (image_codec.py), frames to the
ROS-free runtime (core/runtime.py) and results to messages (image_codec.py, diagnostics.py,
points.py).
"""
from __future__ import annotations

import sys

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import Bool, Float32

from ..core import checkpoint as ckpt
from ..core.runtime import BadInput, Runtime
from ..core.stream_stats import Throttle
from ..core.settings import Settings
from . import image_codec
from .transport import image_qos, output_qos
from .cameras import Camera, node_cameras
from .diagnostics import node_health, ood_stamped, status_array
from .params import declare_node_parameters, split_changes
from .points import CONFIG_PARAMETERS, make_points, points_config, points_values
from .spin import run_node

NODE_NAME = "anomaly_detector"


# anomaly/<name> outputs, lifecycle publishers: they publish only while the node is active
OUTPUTS = {"mask": Image, "score": Image, "overlay": Image, "edited": Image, "ood": Bool, "ood_raw": Bool,
           "ood_score": Float32, "ood_stamped": DiagnosticArray, "points": PointCloud2}


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
        try:
            self._specs, self._node_params, settings = declare_node_parameters(self)
        except ValueError as err:
            raise StartupError(str(err)) from None
        try:
            self._cameras = [Camera(*c) for c in node_cameras(self._node_params, self.resolve_topic_name)]
        except (RuntimeError, ValueError) as err:
            raise StartupError(f"invalid parameter: {err}") from None
        np_ = self._node_params
        self.runtime = Runtime(  # the ROS-free model host: frames, model lifecycle, statistics
            settings, max_input_pixels=np_["max_input_pixels"], source=", ".join(c.topic for c in self._cameras),
            bad_input_log_period=np_["bad_input_log_period"], on_result=self._publish, on_revert=self._revert,
            log=self.get_logger())
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.state = "unconfigured"  # the lifecycle state, as the transitions below leave it
        self._problem = ""  # why the last configure failed (diagnostics)
        self._inputs = []
        self._throttle = Throttle()
        # /diagnostics in every state: a manager or an operator sees why a node is not running
        self._pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(float(np_["diagnostics_period"]), self.publish_diagnostics)

    @property
    def autostart(self) -> bool:
        return bool(self._node_params["autostart"])

    # ------------------------------------------------------------------ parameters

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        changes, node_changes, reason = split_changes(params, self._specs)
        reason = reason or self.runtime.change(**changes)  # validated by the core (values, checkpoint family)
        if reason:
            return SetParametersResult(successful=False, reason=reason)
        self._node_params.update(node_changes)
        self.runtime.max_input_pixels = self._node_params["max_input_pixels"]
        if set(node_changes) & set(CONFIG_PARAMETERS):
            for cam in self._cameras:
                if cam.points is not None:
                    cam.points.config = points_config(self._node_params)
        return SetParametersResult(successful=True)

    def _revert(self, running: Settings, names: list[str]) -> None:
        """The worker could not apply a change: the parameters show the running values again."""
        self.set_parameters([Parameter(n, value=v) for n, v in running.flat().items() if n in names])

    # ------------------------------------------------------------------ lifecycle (executor thread)

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Load the model (and its calibration) and create the outputs; inactive on success."""
        s = self.runtime.settings
        if not s.checkpoint:
            self.get_logger().info(f"no checkpoint parameter: using the model shipped with the package, "
                                   f"{ckpt.DEFAULT_MODEL} (its MODEL_CARD.md says what it is)")
        try:
            points = make_points(self, self._node_params, len(self._cameras))
        except ValueError as err:
            return self._configure_failed(str(err))
        try:
            self.runtime.load()
        except (ckpt.CheckpointError, ValueError, RuntimeError, OSError) as err:
            return self._configure_failed(f"cannot load the model: {err}")
        for cam, p in zip(self._cameras, points):
            cam.points = p
        self._problem = ""
        for cam in self._cameras:
            cam.outputs = {name: self.create_lifecycle_publisher(msg_type, f"{cam.prefix}/{name}", output_qos())
                           for name, msg_type in OUTPUTS.items()}
        self.state = "inactive"
        return super().on_configure(state)

    def _configure_failed(self, problem: str) -> TransitionCallbackReturn:
        self._problem = problem
        self.get_logger().error(f"configure failed, staying unconfigured: {problem}")
        return TransitionCallbackReturn.FAILURE

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Subscribe and serve frames (the lifecycle publishers are enabled by super())."""
        np_ = self._node_params
        in_qos = image_qos(np_["qos_reliability"], np_["qos_depth"])
        sensor = image_qos("best_effort", 5)  # camera_info and depth: matches reliable and best-effort drivers
        self._inputs = []

        def subscribe(msg_type, topic, callback, qos):
            self._inputs.append(self.create_subscription(msg_type, topic, callback, qos))

        for i, cam in enumerate(self._cameras):
            subscribe(Image, cam.topic, self._on_frame(i, image_codec.image_to_rgb), in_qos)
            if np_["subscribe_compressed"]:
                subscribe(CompressedImage, cam.topic.rstrip("/") + "/compressed",
                          self._on_frame(i, image_codec.compressed_to_rgb), in_qos)
            subscribe(CameraInfo, cam.info_topic, cam.points.on_camera_info, sensor)
        if np_["depth_topic"]:  # a single camera (node_cameras)
            subscribe(Image, np_["depth_topic"], self._cameras[0].points.on_depth, sensor)
        self.runtime.start()
        self.state = "active"
        result = super().on_activate(state)
        self.get_logger().info(
            f"listening on {', '.join(sub.topic_name for sub in self._inputs)} ({np_['qos_reliability']}, depth "
            f"{np_['qos_depth']}); "
            f"publishing {', '.join(self.resolve_topic_name(c.prefix) for c in self._cameras)}/"
            f"{{{','.join(OUTPUTS)}}}")
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop listening and publishing; the model stays loaded."""
        self.state = "inactive"  # first: a frame finishing now is not published
        self._unsubscribe()
        self.runtime.stop()
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
        self.runtime.release()
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
            self.runtime.release()

    @property
    def problem(self) -> str:
        """Why the last configure failed ("" if it did not)."""
        return self._problem

    # ------------------------------------------------------------------ callbacks (executor thread)

    def _on_frame(self, camera: int, decode):
        """The callback of camera `camera`'s frames: each goes to the runtime as that source."""
        return lambda msg: self.runtime.submit(_decoder(msg, decode), (camera, msg.header), source=camera)

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
        out["ood"].publish(Bool(data=bool(result.ood_filtered)))
        out["ood_raw"].publish(Bool(data=bool(result.is_ood)))
        out["ood_score"].publish(Float32(data=float(result.frame_score)))
        out["ood_stamped"].publish(ood_stamped(self.get_name(), header, result, det))
        if self._node_params["publish_overlay"] and out["overlay"].get_subscription_count() > 0:
            from ..core.visualize import overlay

            picture = overlay(rgb, result.score, result.mask, det.settings.post.overlay_alpha)
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
        w = self.runtime.window()
        values = {**w.values(), "lifecycle_state": self.state, **self.runtime.model_values()}
        points = [c.points for c in self._cameras if c.points is not None]
        if points:
            values.update(points_values(points))
        health = w.health() if self.state == "active" else node_health(self.state, self._problem)
        det = self.runtime.detector
        arr = status_array(f"{self.get_name()}: anomaly detection", health, values, str(det.device) if det else "")
        arr.header.stamp = self.get_clock().now().to_msg()
        self._pub_diag.publish(arr)


def _start(node: DetectorNode) -> None:
    if node.autostart and not node.start():
        raise StartupError(node.problem)


def _close(node: DetectorNode) -> None:
    node.stop()
    node.destroy_node()


def main(args=None) -> int:
    """Console script `detector_node`; the shutdown transition ends the process."""
    return run_node(NODE_NAME, DetectorNode, lambda node: node.state == "finalized", fatal=(StartupError,),
                    start=_start, close=_close, args=args, period_s=0.2)


if __name__ == "__main__":
    sys.exit(main())
