"""Launch files and parameter files, checked without `launch` (not installable here): the
launch files are parsed with `ast`, the parameter files are loaded and then used to start
the real detector node."""
from __future__ import annotations

import ast
import fnmatch
import importlib
import importlib.util
import re
import time
from pathlib import Path

import pytest
import yaml
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import ParameterType
from rcl_interfaces.srv import GetParameters
from sensor_msgs.msg import Image

from conftest import ROOT, detector_args, random_frame, stamp_of, stamped_image
from ros_anomaly_diffusion.core.settings import NAMES, Settings, check, spec
from ros_anomaly_diffusion.core.variants import VARIANTS
from ros_anomaly_diffusion.ros.params import NODE_PARAMETERS

PACKAGE = "ros_anomaly_diffusion"
LAUNCH = ROOT / "launch"
CONFIG = ROOT / "config"
LAUNCH_FILES = ["anomaly_detection.launch.py", "rugd_replay.launch.py", "multi_camera.launch.py"]
OTHER_EXECUTABLES = {("rviz2", "rviz2"), ("nav2_lifecycle_manager", "lifecycle_manager")}  # other packages


def _tree(name: str) -> ast.Module:
    return ast.parse((LAUNCH / name).read_text(), filename=name)


def _constants(tree: ast.Module) -> dict[str, object]:
    """Module-level NAME = <literal> assignments (PACKAGE = '...')."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out[t.id] = node.value.value
    return out


def _value(node: ast.AST, consts: dict) -> object:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and node.id in consts:
        return consts[node.id]
    return None


def _calls(tree: ast.Module, func: str) -> list[ast.Call]:
    def name(f):
        return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and name(n.func) == func]


def _kwargs(call: ast.Call, consts: dict) -> dict[str, object]:
    return {k.arg: _value(k.value, consts) for k in call.keywords if k.arg}


def _declared_arguments(tree: ast.Module) -> dict[str, object]:
    consts = _constants(tree)
    out = {}
    for call in _calls(tree, "DeclareLaunchArgument"):
        out[_value(call.args[0], consts)] = _kwargs(call, consts).get("default_value")
    return out


def console_scripts() -> dict[str, str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and k.value == "console_scripts":
                    entries = [e.value for e in v.elts]
                    return {e.split("=")[0].strip(): e.split("=")[1].strip() for e in entries}
    raise AssertionError("no console_scripts in setup.py")


def data_file_globs() -> list[str]:
    text = (ROOT / "setup.py").read_text()
    return re.findall(r'glob\("([^"]+)"\)', text)


@pytest.mark.parametrize("name", LAUNCH_FILES)
def test_launch_file_nodes_are_installed_executables(name):
    tree = _tree(name)
    consts = _constants(tree)
    scripts = console_scripts()
    nodes = [_kwargs(c, consts) for c in _calls(tree, "Node")]
    assert nodes, f"{name} starts no Node"
    for kw in nodes:
        pkg, exe = kw.get("package"), kw.get("executable")
        assert isinstance(pkg, str) and isinstance(exe, str), f"{name}: package/executable must be literals"
        if pkg == PACKAGE:
            assert exe in scripts, f"{name}: {exe} is not a console_scripts entry point of setup.py"
            module, func = scripts[exe].split(":")
            assert callable(getattr(importlib.import_module(module), func)), scripts[exe]
        else:
            assert (pkg, exe) in OTHER_EXECUTABLES, f"{name}: unexpected executable {pkg}/{exe}"


@pytest.mark.parametrize("name", LAUNCH_FILES)
def test_launch_files_are_installed_and_name_existing_files(name):
    globs = data_file_globs()
    assert any(fnmatch.fnmatch(f"launch/{name}", g) for g in globs), f"setup.py does not install launch/{name}"
    tree = _tree(name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            v = node.value
            if re.fullmatch(r"[\w.-]+\.(yaml|rviz)", v):
                assert (CONFIG / v).is_file(), f"{name} names config/{v}, which does not exist"
                assert any(fnmatch.fnmatch(f"config/{v}", g) for g in globs), f"setup.py does not install {v}"
            elif v.endswith(".launch.py"):
                assert (LAUNCH / v).is_file(), f"{name} includes {v}, which does not exist"
    # every LaunchConfiguration refers to an argument the file declares
    declared = _declared_arguments(tree)
    consts = _constants(tree)
    used = {_value(c.args[0], consts) for c in _calls(tree, "LaunchConfiguration") + _calls(tree, "arg")} - {None}
    assert used, f"{name} reads no launch argument"
    assert used <= set(declared), f"{name}: undeclared launch arguments {used - set(declared)}"


@pytest.mark.parametrize("name", LAUNCH_FILES)
def test_launch_files_set_the_large_frame_dds_settings_first(name):
    """Everything a launch file starts (ours, rviz2, a camera driver included beside it) gets the
    DDS settings for camera-sized frames: the first entry of the LaunchDescription applies them,
    from the installed config folder, which setup.py installs the profiles into."""
    tree = _tree(name)
    (desc,) = _calls(tree, "LaunchDescription")
    first = desc.args[0].elts[0]
    assert isinstance(first, ast.Starred) and isinstance(first.value, ast.Call), f"{name}: no DDS settings first"
    call = first.value
    assert getattr(call.func, "id", None) == "large_frame_launch_actions", ast.unparse(call)
    assert "'config'" in ast.unparse(call.args[0])
    module, imported = next((n.module, {a.name for a in n.names}) for n in ast.walk(tree)
                            if isinstance(n, ast.ImportFrom) and n.module.endswith("transport"))
    assert module == "ros_anomaly_diffusion.ros.transport" and "large_frame_launch_actions" in imported
    globs = data_file_globs()
    for profile in ("fastdds_large_frames.xml", "cyclonedds_large_frames.xml"):
        assert (CONFIG / profile).is_file() and any(fnmatch.fnmatch(f"config/{profile}", g) for g in globs)


def test_detection_launch_arguments_and_variant_default():
    args = _declared_arguments(_tree("anomaly_detection.launch.py"))
    assert set(args) >= {"variant", "namespace", "image_topic", "use_sim_time", "checkpoint", "device", "rviz",
                         "camera_info_topic", "depth_topic", "target_frame", "autostart", "lifecycle_manager",
                         "backend", "precision"}
    for name in ("multi_camera.launch.py", "anomaly_detection.launch.py"):  # backend:=..., precision:=...
        tree, src = _declared_arguments(_tree(name)), (LAUNCH / name).read_text()
        assert tree["backend"] == tree["precision"] == "" and "for key in ('backend', 'precision'):" in src, name
        assert {"backend", "precision"} <= set(NAMES)  # settings the node declares as parameters
    # the navigation wiring reaches the node's parameters, which exist
    src = (LAUNCH / "anomaly_detection.launch.py").read_text()
    for name in ("target_frame", "camera_info_topic", "depth_topic", "autostart"):
        assert f"overrides['{name}']" in src and name in NODE_PARAMETERS, name
    assert (args["autostart"], args["lifecycle_manager"], args["target_frame"]) == ("true", "false", "base_link")
    # a manager started here drives the detector: bond off (no bondcpp in rclpy), the node's own name
    assert "'node_names': ['anomaly_detector']" in src and "'bond_timeout': 0.0" in src
    # one default: launch files, node and CLI run the checkpoint's variant (the shipped model's: knn)
    assert args["variant"] == Settings().variant == ""
    for name in ("multi_camera.launch.py", "rugd_replay.launch.py"):
        assert _declared_arguments(_tree(name))["variant"] == Settings().variant, name
    assert args["rviz"] == "false" and args["use_sim_time"] == "false"
    src = (LAUNCH / "anomaly_detection.launch.py").read_text()
    assert "params_file = str(variant_params_file(variant))" in src
    assert "remappings=[('image', image_topic)]" in src


def test_replay_launch_passes_only_known_arguments_and_parameters():
    from ros_anomaly_diffusion.ros.replay_node import PARAMETERS

    tree = _tree("rugd_replay.launch.py")
    detection_args = set(_declared_arguments(_tree("anomaly_detection.launch.py")))
    assert "data" in _declared_arguments(tree)
    (include,) = _calls(tree, "IncludeLaunchDescription")
    launch_arguments = next(k.value for k in include.keywords if k.arg == "launch_arguments")
    keys = {k.value for k in launch_arguments.func.value.keys}  # {...}.items()
    assert keys <= detection_args and keys >= {"variant", "image_topic", "checkpoint"}
    (replay,) = [c for c in _calls(tree, "Node")]
    params = next(k.value for k in replay.keywords if k.arg == "parameters").elts[0]
    names = {k.value for k in params.keys}
    assert names <= set(PARAMETERS) | {"use_sim_time"}
    assert {"source", "topic", "rate_hz", "loop"} <= names


def test_multi_camera_launch_arguments_and_one_node_per_camera():
    name = "multi_camera.launch.py"
    tree = _tree(name)
    args = _declared_arguments(tree)
    assert set(args) >= {"cameras", "variant", "checkpoint", "device", "use_sim_time", "one_model"}
    assert args["variant"] == "" and args["use_sim_time"] == "false" and args["one_model"] == "true"
    src = (LAUNCH / name).read_text()
    assert "params_file = str(variant_params_file(variant))" in src and "remappings=[('image', topic)]" in src
    assert "pairs = camera_namespaces(arg('cameras'))" in src and "for topic, namespace in pairs" in src
    assert "namespace=namespace" in src
    # one_model: one node whose `cameras` parameter (which exists) lists every topic
    assert "cameras=','.join(topic for topic, _ in pairs)" in src and "cameras" in NODE_PARAMETERS
    assert "from ros_anomaly_diffusion.ros.cameras import camera_namespaces" in src
    # the shared arguments reach every node the same way as in anomaly_detection.launch.py
    for key in ("checkpoint", "device", "variant", "use_sim_time"):
        assert f"'{key}'" in src.split("def _launch_nodes", 1)[1]
    nodes = _calls(tree, "Node")
    assert len(nodes) == 2 and all(_kwargs(n, _constants(tree))["name"] == "anomaly_detector" for n in nodes)

    from ros_anomaly_diffusion.ros.cameras import camera_namespaces as ns

    assert ns("/front/image_raw,/rear/image_raw") == [("/front/image_raw", "front"), ("/rear/image_raw", "rear")]
    assert ns(" /robot/left/image_rect , ,right/image_raw,/image_raw ") == [
        ("/robot/left/image_rect", "robot/left"), ("/right/image_raw", "right"), ("/image_raw", "image_raw")]
    for bad, needle in [("", "cameras is empty"), (" , ", "cameras is empty"),
                        ("/front/image_raw,/front/image_rect", "would both run in namespace /front"),
                        ("/front cam/image", "not a valid topic name"), ("/1cam/image", "not a valid topic name")]:
        with pytest.raises(RuntimeError, match=re.escape(needle)):
            ns(bad)


@pytest.mark.timeout(300)
def test_two_cameras_two_detectors_each_answers_its_own_frames(spawn, probe, tiny_checkpoint):
    """What multi_camera.launch.py starts for cameras:=/cam_a/image_raw,/cam_b/image_raw: two
    detector_node processes, namespaces from the launch file's own rule, each remapped to its
    camera, both fed at the same time."""
    from ros_anomaly_diffusion.ros.cameras import camera_namespaces

    pairs = camera_namespaces("/cam_a/image_raw,/cam_b/image_raw")
    assert [n for _, n in pairs] == ["cam_a", "cam_b"]
    nodes, masks, pubs = {}, {}, {}
    for topic, ns in pairs:
        nodes[ns] = spawn("detector_node", *detector_args(tiny_checkpoint, "-p", "steps:=2", "-p", "segments:=none",
                                                          "-r", f"image:={topic}", "-r", f"__ns:=/{ns}"))
    diag = probe.collect(DiagnosticArray, "/diagnostics")
    for topic, ns in pairs:
        nodes[ns].wait_for_output(f"listening on {topic}", timeout=180)
        masks[ns] = probe.collect(Image, f"/{ns}/anomaly/mask")
        pubs[ns] = probe.publisher(Image, topic)
        probe.wait_for_subscriber(pubs[ns])
    # both cameras at 5 Hz at once, each frame stamped with its camera's frame_id
    t_end, k = time.monotonic() + 8.0, 0
    while time.monotonic() < t_end and not all(len(m) >= 4 for m in masks.values()):
        for _, ns in pairs:
            pubs[ns].publish(stamped_image(random_frame(seed=k), 600 + k, frame_id=f"{ns}_optical"))
        k += 1
        probe.spin_for(0.2)
    probe.spin_until(lambda: all(len(m) >= 4 for m in masks.values()), 60, "4 results from each detector")
    for _, ns in pairs:
        ids = {m.header.frame_id for _, m in masks[ns]}
        assert ids == {f"{ns}_optical"}, (ns, ids)  # its own frames only
        assert nodes[ns].alive()
    # at the same time: the two result streams overlap in time
    a, b = ([t for t, _ in masks[ns]] for _, ns in pairs)
    assert a[0] < b[-1] and b[0] < a[-1], (a, b)

    def inputs():
        return {v["input_topic"] for _, arr in diag for v in [{kv.key: kv.value for kv in arr.status[0].values}]
                if int(v["frames_processed"]) > 0}

    probe.spin_until(lambda: inputs() >= {t for t, _ in pairs}, 60, "/diagnostics of both detectors")


def _load_params(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict) and list(doc) == ["/**"], f"{path.name}: expected one '/**' section"
    assert list(doc["/**"]) == ["ros__parameters"], f"{path.name}: expected '/**: ros__parameters:'"
    params = doc["/**"]["ros__parameters"]
    assert isinstance(params, dict) and params
    return params


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_has_a_valid_parameter_file(variant):
    path = CONFIG / f"{variant}.yaml"
    assert path.is_file(), f"variant {variant!r} has no config/{variant}.yaml"
    params = _load_params(path)
    settings = set(NAMES)
    for name, value in params.items():
        assert name in settings or name in NODE_PARAMETERS, f"{path.name}: unknown parameter {name!r}"
        reason = check(name, value) if name in settings else NODE_PARAMETERS[name].check(value)
        assert reason is None, f"{path.name}: {reason}"
        if name in settings and isinstance(spec(name)["default"], float):
            assert isinstance(value, float), f"{path.name}: write {name} as a float ({value}.0)"
    assert params["variant"] == variant
    Settings.from_dict({k: v for k, v in params.items() if k in settings})


def test_variant_specific_values():
    ddim, ddpm = _load_params(CONFIG / "ddim.yaml"), _load_params(CONFIG / "ddpm.yaml")
    assert (ddim["steps"], ddim["start_timestep"], ddim["guidance_scale"], ddim["reconstruction_guidance"],
            ddim["draws"]) == (5, 600, 0.0, 0.0, 4)
    assert (ddpm["ddpm_guidance_scale"], ddpm["reconstruction_guidance"], ddpm["draws"]) == (1000.0, 0.0, 1)
    for p in (ddim, ddpm):
        assert p["device"] == "cpu" and p["segments"] == "auto"


def test_a_variant_without_a_parameter_file_is_refused_naming_the_variants():
    """What the launch files, demo and soaks load: config/<variant>.yaml, or an error listing the
    registered variants (not every YAML in config/: the Nav2 example is not a variant)."""
    from ros_anomaly_diffusion.config import variant_params_file

    assert variant_params_file("knn").read_text() == (CONFIG / "knn.yaml").read_text()  # share/ or source tree
    with pytest.raises(FileNotFoundError, match=r"no parameter file for variant 'nope'; variants: ddpm, ddim, "
                                                r"inversion, feature_edit, knn, dcae$"):
        variant_params_file("nope")


def test_nav2_costmap_example_takes_the_detector_points():
    doc = yaml.safe_load((CONFIG / "nav2_anomaly_costmap.yaml").read_text())
    params = doc["local_costmap"]["local_costmap"]["ros__parameters"]
    assert "anomaly_layer" in params["plugins"]
    assert params["plugins"].index("anomaly_layer") < params["plugins"].index("inflation_layer")
    layer = params["anomaly_layer"]
    assert layer["plugin"] == "nav2_costmap_2d::ObstacleLayer" and layer["observation_sources"] == "anomaly"
    src = layer["anomaly"]
    # the node's topic (no namespace) and message type
    assert src["topic"] == "/anomaly/points" and src["data_type"] == "PointCloud2"
    assert src["marking"] is True and src["clearing"] is False
    # ground-plane points (z = ground_z = 0 by default) pass both height windows
    ground_z = NODE_PARAMETERS["ground_z"].default
    for window in (src, layer):
        assert window["min_obstacle_height"] < ground_z < window["max_obstacle_height"]
    assert src["obstacle_max_range"] <= NODE_PARAMETERS["max_range"].default
    assert any(fnmatch.fnmatch("config/nav2_anomaly_costmap.yaml", g) for g in data_file_globs())


def test_rviz_config_shows_camera_overlay_and_mask():
    doc = yaml.safe_load((CONFIG / "anomaly.rviz").read_text())
    displays = doc["Visualization Manager"]["Displays"]
    topics = {d["Topic"]["Value"] for d in displays if d["Class"] == "rviz_default_plugins/Image"}
    assert topics == {"/camera/image", "/anomaly/overlay", "/anomaly/mask"}
    assert all(d["Enabled"] for d in displays)
    # the launch file rewrites these literal topic names for image_topic / namespace
    src = (LAUNCH / "anomaly_detection.launch.py").read_text()
    assert "'Value: /camera/image'" in src and "'Value: /anomaly/'" in src


@pytest.mark.timeout(240)
@pytest.mark.parametrize("variant, overrides", [
    ("ddim", ["-p", "steps:=2"]),
    # ddpm runs all T steps: with the 50-step checkpoint that is 50 network calls (~1 s);
    # the real 1000-step schedule would take ~17 s a frame on this CPU.
    ("ddpm", []),
    ("inversion", []),
    ("feature_edit", []),
    ("knn", []),
    ("dcae", ["-p", "steps:=2"]),
])
def test_detector_starts_with_each_parameter_file(variant, overrides, spawn, probe, tiny_checkpoint,
                                                  short_checkpoint, family_checkpoint):
    family = VARIANTS[variant].family
    ckpt = (family_checkpoint(family) if family != "pixel" else short_checkpoint if variant == "ddpm"
            else tiny_checkpoint)
    topic = f"/launch_{variant}/image"
    node = spawn("detector_node", "--ros-args", "--params-file", str(CONFIG / f"{variant}.yaml"),
                 *detector_args(ckpt, *overrides, "-r", f"image:={topic}", "-r", f"__ns:=/lt_{variant}",
                                variant=None)[1:])
    node.wait_for_output(rf"variant {variant} \(NFE \d+\)", timeout=90)
    node.wait_for_output(f"listening on {topic}", timeout=30)
    masks = probe.collect(Image, f"/lt_{variant}/anomaly/mask")
    pub = probe.publisher(Image, topic)
    probe.wait_for_subscriber(pub)
    for attempt in range(10):  # again if the first frame went out before discovery completed
        pub.publish(stamped_image(random_frame(seed=attempt), 500 + attempt))
        if probe.spin_until_or_timeout(lambda: masks or not node.alive(), 5):
            break
    assert masks and node.alive(), node.output
    assert stamp_of(masks[0][1])[0] >= 500
    # the node runs with the file's values (command-line -p after --params-file wins)
    file_params = _load_params(CONFIG / f"{variant}.yaml")
    names = sorted(set(file_params) - {"steps"})
    reply = probe.call(GetParameters, f"/lt_{variant}/anomaly_detector/get_parameters",
                       GetParameters.Request(names=names))
    kinds = {ParameterType.PARAMETER_STRING: "string_value", ParameterType.PARAMETER_DOUBLE: "double_value",
             ParameterType.PARAMETER_INTEGER: "integer_value", ParameterType.PARAMETER_BOOL: "bool_value"}
    got = {n: getattr(v, kinds[v.type]) for n, v in zip(names, reply.values)}
    for n in names:
        assert got[n] == file_params[n], (n, got[n], file_params[n])
    if variant == "ddpm":
        assert "NFE 50" in node.output  # 50 DDPM steps, compared with the frame (ddpm.yaml)


def _launched_nodes(name: str, monkeypatch, **arguments: str) -> list[dict]:
    """Run launch/<name>'s generate_launch_description() and its OpaqueFunction as `ros2 launch`
    would, with stand-ins for `launch` and `launch_ros` (not installable here) that record what
    the file asks for: the keyword arguments of every Node it starts. Arguments not given take
    the file's declared defaults."""
    import sys
    import types
    from types import SimpleNamespace

    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, m)
        return m

    declared = {}

    class DeclareLaunchArgument:
        def __init__(self, name, default_value=None, description=""):
            declared[name] = default_value

    class LaunchConfiguration:
        def __init__(self, name):
            self.name = name

        def perform(self, context):
            return context[self.name]

    module("launch", LaunchDescription=list)
    module("launch.actions", DeclareLaunchArgument=DeclareLaunchArgument, SetEnvironmentVariable=lambda k, v: None,
           OpaqueFunction=lambda function: SimpleNamespace(function=function))
    module("launch.substitutions", LaunchConfiguration=LaunchConfiguration)
    module("launch_ros")
    module("launch_ros.actions", Node=lambda **kwargs: kwargs)
    module("ament_index_python.packages", get_package_share_directory=lambda package: str(ROOT))
    spec = importlib.util.spec_from_file_location(name.replace(".", "_"), LAUNCH / name)
    launch_file = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch_file)
    actions = launch_file.generate_launch_description()
    opaque = next(a for a in actions if isinstance(a, SimpleNamespace))
    return opaque.function({**declared, **arguments})


@pytest.mark.parametrize("name", ["anomaly_detection.launch.py", "multi_camera.launch.py"])
def test_launch_files_run_the_checkpoints_variant_when_none_is_given(name, monkeypatch, tiny_checkpoint):
    """variant:= empty (the default): the checkpoint's variant and its parameter file (the
    conftest's pixel checkpoint records none: its family's ddim); the shipped model's knn
    without a checkpoint; an explicit variant as given."""
    def detector(**arguments):
        node = next(n for n in _launched_nodes(name, monkeypatch, **arguments) if n["executable"] == "detector_node")
        params_file, overrides = node["parameters"]
        return Path(params_file).name, overrides["variant"]

    assert detector(checkpoint=str(tiny_checkpoint)) == ("ddim.yaml", "ddim")
    assert detector() == ("knn.yaml", "knn")
    assert detector(checkpoint=str(tiny_checkpoint), variant="ddpm") == ("ddpm.yaml", "ddpm")
