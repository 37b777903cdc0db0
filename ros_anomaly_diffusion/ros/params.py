"""The detector node's ROS parameters as plain data (no rclpy import).

One parameter per field of `core.settings.Settings` (description, type and range read
from the field's metadata, so that table stays the single source of truth), plus the
node-only parameters below. The launch-file test and the node both read this module.
`descriptor` is how every node of the package (detector, replay) declares a ParamSpec.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType

from ..core.settings import NAMES, Settings, check_value, spec


@dataclass(frozen=True)
class ParamSpec:
    name: str
    default: Any
    description: str
    lo: float | int | None = None
    hi: float | int | None = None
    choices: tuple | None = None
    read_only: bool = False

    @property
    def type(self) -> type:
        return type(self.default)

    def check(self, value: Any) -> str | None:
        """Reason why `value` is unacceptable (node-only parameters; settings use core.settings.check,
        both the rule of core.settings.check_value)."""
        if self.type is list:  # a fixed-length array of doubles (xyz, rpy)
            n = len(self.default)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != n or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
                return f"{self.name} must be {n} finite numbers, got {value!r}"
            return None
        return check_value(self.name, value, self.default, self.lo, self.hi, self.choices)


MAX_INPUT_PIXELS = 8_000_000  # 8 MP: a 4000x3000 frame is downscaled to about 3265x2449

NODE_PARAMETERS: dict[str, ParamSpec] = {p.name: p for p in (
    ParamSpec("qos_reliability", "best_effort",
              "reliability of the image subscription: best_effort (sensor-data profile, matches every "
              "publisher) or reliable", choices=("best_effort", "reliable"), read_only=True),
    ParamSpec("qos_depth", 1, "history depth of the image subscription (the node keeps only the newest "
              "frame anyway)", 1, 100, read_only=True),
    ParamSpec("subscribe_compressed", False, "also subscribe to <image>/compressed "
              "(sensor_msgs/CompressedImage, jpeg or png)", read_only=True),
    ParamSpec("publish_overlay", True, "publish anomaly/overlay (computed only while someone subscribes)"),
    ParamSpec("publish_edited", True, "publish anomaly/edited, the frame as edited towards the normal "
              "model (computed only while someone subscribes)"),
    ParamSpec("diagnostics_period", 1.0, "seconds between /diagnostics messages", 0.1, 60.0,
              read_only=True),
    ParamSpec("bad_input_log_period", 5.0, "at most one log line per kind of bad input frame per this "
              "many seconds", 0.0, 3600.0, read_only=True),
    ParamSpec("max_input_pixels", MAX_INPUT_PIXELS, "frames with more pixels than this are downscaled "
              "(INTER_AREA, aspect ratio kept) before the detector; the outputs then have the downscaled "
              "resolution (same aspect ratio, input header)", 4096, 1_000_000_000),
    ParamSpec("cameras", "", "comma-separated image topics served by this node with one model (the newest frame "
              "of each in one batch); each camera's outputs go to its namespace (/front/image_raw -> "
              "/front/anomaly/mask) with its headers; empty: the single `image` input", read_only=True),
    # anomaly points (ros/points.py)
    ParamSpec("publish_points", True, "publish anomaly/points (sensor_msgs/PointCloud2 of the anomalous pixels in "
              "target_frame; computed only while someone subscribes and CameraInfo has arrived)"),
    ParamSpec("target_frame", "base_link", "frame of anomaly/points", read_only=True),
    ParamSpec("camera_info_topic", "", "sensor_msgs/CameraInfo of the camera; empty: camera_info beside the image "
              "topic (image_pipeline convention: /camera/image_raw -> /camera/camera_info)", read_only=True),
    ParamSpec("depth_topic", "", "aligned depth image (16UC1 millimetres or 32FC1 metres, the colour camera's "
              "resolution or another) for back-projection; empty: project onto the ground plane", read_only=True),
    ParamSpec("depth_tolerance", 0.05, "seconds between the image stamp and the depth frame paired with it "
              "(nearest stamp); further: no points for that frame", 0.0, 1.0),
    ParamSpec("max_range", 20.0, "metres from the camera beyond which anomaly points are dropped", 0.1, 1000.0),
    ParamSpec("point_stride", 8, "anomalous pixels are sampled every point_stride pixels of the published mask",
              1, 256),
    ParamSpec("ground_z", 0.0, "height of the ground plane in target_frame (flat-ground projection, metres)",
              -100.0, 100.0),
    ParamSpec("pose_source", "auto", "camera pose in target_frame: tf (tf2 lookup of the image's frame_id), "
              "static (camera_xyz, camera_rpy) or auto (tf2 when tf2_ros is importable, else static)",
              choices=("auto", "tf", "static"), read_only=True),
    ParamSpec("camera_xyz", [0.0, 0.0, 1.0], "static extrinsics: position of the camera's OPTICAL frame in "
              "target_frame, metres (floats)"),
    ParamSpec("camera_rpy", [-math.pi / 2, 0.0, -math.pi / 2], "static extrinsics: roll, pitch, yaw (fixed axes, "
              "as tf2/URDF) of the camera's OPTICAL frame in target_frame, radians (floats); a forward camera "
              "pitched down by p: [-pi/2 - p, 0, -pi/2]"),
    ParamSpec("autostart", True, "configure and activate the managed node at start-up (ros2 run, the "
              "launch files); false: wait for lifecycle transitions (Nav2's lifecycle_manager, ros2 "
              "lifecycle set)", read_only=True),
)}


# Declared first: the defaults of the other parameters depend on them (variant_defaults).
MODEL_PARAMETERS = ("variant", "checkpoint")


def settings_parameters(defaults: Settings | None = None) -> dict[str, ParamSpec]:
    """One ParamSpec per Settings field, from the field metadata; default values from
    `defaults` (a variant's parameter file, variant_defaults) or the field's own."""
    out = {}
    given = defaults.flat() if defaults is not None else {}
    for name in NAMES:
        s = spec(name)
        desc = s["description"]
        if s["choices"]:
            desc += f" (one of: {', '.join(s['choices'])})"
        default = s["default"] if name in MODEL_PARAMETERS else given.get(name, s["default"])
        out[name] = ParamSpec(name, default, desc, s["lo"], s["hi"], s["choices"])
    return out


def variant_defaults(variant: str, checkpoint: str) -> Settings | None:
    """What the node's parameters default to: config/<variant>.yaml, of the variant the
    checkpoint (empty: the shipped model) was trained for when `variant` is empty, so that
    `-p checkpoint:=X` alone runs X as its variant's parameter file says. None when that
    cannot be read (configure then says why)."""
    from ..config import variant_settings

    try:
        return variant_settings(variant, checkpoint=checkpoint)
    except (ValueError, OSError, RuntimeError):  # CheckpointError is a RuntimeError
        return None


def declare_node_parameters(node) -> tuple[dict[str, ParamSpec], dict[str, Any], Settings]:
    """Declare every parameter of the detector node on `node` -> (specs by name, node-only
    values, Settings). `variant` and `checkpoint` come first: the other Settings parameters
    default to that variant's parameter file (variant_defaults). ValueError: what is invalid."""
    model = {n: settings_parameters()[n] for n in MODEL_PARAMETERS}
    declare_parameters(node, model.values())
    chosen = {n: node.get_parameter(n).value for n in MODEL_PARAMETERS}
    specs = {**settings_parameters(variant_defaults(**chosen)), **NODE_PARAMETERS}
    declare_parameters(node, [p for n, p in specs.items() if n not in MODEL_PARAMETERS])
    values = {n: node.get_parameter(n).value for n in specs}
    for name in NODE_PARAMETERS:
        reason = NODE_PARAMETERS[name].check(values[name])
        if reason:
            raise ValueError(f"invalid parameter: {reason}")
    try:
        settings = Settings.from_dict({n: values[n] for n in NAMES})  # core.settings.check
    except ValueError as err:
        raise ValueError(f"invalid parameter: {err}") from None
    return specs, {n: values[n] for n in NODE_PARAMETERS}, settings


def split_changes(params, specs: dict[str, ParamSpec]) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """A parameter update -> (Settings changes, node-parameter changes, why it is refused or
    None). Node parameters are checked here, Settings by the runtime (Runtime.change);
    parameters not in `specs` (rclpy's own, e.g. use_sim_time) are left out."""
    settings, node = {}, {}
    for prm in params:
        if prm.name not in specs:
            continue
        value = as_declared_type(specs[prm.name].default, prm.value)
        if prm.name in NODE_PARAMETERS:
            reason = NODE_PARAMETERS[prm.name].check(value)
            if reason:
                return {}, {}, reason
            node[prm.name] = value
        else:
            settings[prm.name] = value
    return settings, node, None


def as_declared_type(default: Any, value: Any) -> Any:
    """The one int -> float rule: an integer (not a bool) given for a double parameter is that
    double (`-p guidance_scale:=1`, `steps: 3000` in YAML, `ros2 param set ... 1`)."""
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


_DOUBLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # node -> {double parameter: default}


def declare_parameters(node, specs) -> None:
    """Declare the ParamSpecs on `node` (descriptor() below), accepting integers for double
    parameters at start-up and later, with rclpy's public API only: static typing would refuse
    an integer override before any callback sees it, so a double parameter is declared
    dynamically typed and then given its descriptor with the value as a double (set_descriptor);
    later integer sets are converted by a pre-set callback (rclpy >= Iron; Humble refuses them),
    one per node however many calls declare its parameters (rclpy concatenates what every
    pre-set callback returns). ValueError naming the parameter for a start-up value of the
    wrong type or out of range."""
    from rcl_interfaces.msg import ParameterValue
    from rclpy.parameter import Parameter

    first = node not in _DOUBLES
    doubles = _DOUBLES.setdefault(node, {})
    for p in specs:
        try:
            if p.type is not float:
                node.declare_parameter(p.name, p.default, descriptor(p))
                continue
            doubles[p.name] = p.default
            value = as_declared_type(p.default, node.declare_parameter(
                p.name, p.default, ParameterDescriptor(dynamic_typing=True)).value)
            node.set_descriptor(p.name, descriptor(p), ParameterValue(
                type=ParameterType.PARAMETER_DOUBLE, double_value=value) if isinstance(value, float) else None)
        except Exception as err:  # rclpy's InvalidParameterValue/TypeException
            raise ValueError(f"invalid parameter {p.name}: {err}") from None

    def as_doubles(params: list) -> list:
        return [Parameter(p.name, Parameter.Type.DOUBLE, as_declared_type(doubles[p.name], p.value))
                if p.name in doubles and p.type_ == Parameter.Type.INTEGER else p for p in params]

    if first and hasattr(node, "add_pre_set_parameters_callback"):
        node.add_pre_set_parameters_callback(as_doubles)


# ---- declaring a ParamSpec (detector and replay node) ----

_ROS_TYPES = {bool: ParameterType.PARAMETER_BOOL, int: ParameterType.PARAMETER_INTEGER,
              float: ParameterType.PARAMETER_DOUBLE, str: ParameterType.PARAMETER_STRING,
              list: ParameterType.PARAMETER_DOUBLE_ARRAY}


def descriptor(p: ParamSpec) -> ParameterDescriptor:
    """What `ros2 param describe` shows and rclpy enforces: type, description, read-only, range."""
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
