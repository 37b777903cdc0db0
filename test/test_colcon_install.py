"""The robot's path (README, "On a robot"): the package built into a colcon workspace with
`colcon build --packages-select ros_anomaly_diffusion` (no symlink install), the files
`ros2 launch` and `ros2 run` look up installed where they look, and the *installed*
`detector_node`, started under the workspace's sourced setup, answering a real RUGD frame
over DDS with the model shipped inside the install.

The lists of files expected in the install come from the repository, so a file that
setup.py's data_files or package_data forget fails here. One build per module (~2 s);
the node's start and first frame take most of the module's time."""
from __future__ import annotations

import filecmp
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticArray
from sensor_msgs.msg import Image

from conftest import BIN, ROOT, as_array, by_stamp, send_until, stamp_of, stamped_image

pytestmark = pytest.mark.timeout(300)

PKG = "ros_anomaly_diffusion"
PYVER = f"python{sys.version_info.major}.{sys.version_info.minor}"


def repo_state() -> set[str] | None:
    """What `git status` says about the checkout (ignored entries too, so build/, log/ or a
    new *.egg-info count), plus the source tree's egg-info (pip's, rewritten only by pip) by
    modification time; None where the checkout is no git repository."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return None
    out = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--ignored"], capture_output=True,
                         text=True, check=True).stdout
    egg_info = {f"{p.relative_to(ROOT)} {p.stat().st_mtime_ns}" for p in ROOT.glob("*.egg-info/*")}
    return set(out.splitlines()) | egg_info


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The README's workspace: src/ros_anomaly_diffusion -> this checkout, built with the
    venv's colcon (the venv's python first on PATH, so ament_python builds and installs with it)."""
    colcon = BIN / "colcon"
    assert colcon.is_file(), f"{colcon} missing: install the test extra (pip install -e '.[test]')"
    root = tmp_path_factory.mktemp("colcon_ws")
    (root / "src").mkdir()
    (root / "src" / PKG).symlink_to(ROOT, target_is_directory=True)
    # a developer's ~/.colcon/defaults.yaml (symlink-install: true, ...) must not change the command
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "COLCON_HOME": str(root / ".colcon_home")}
    before = repo_state()
    run = subprocess.run([str(colcon), "build", "--packages-select", PKG], cwd=root, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    after = repo_state()
    if run.returncode != 0:
        log = root / "log" / "latest_build" / PKG / "stdout_stderr.log"
        pytest.fail(f"colcon build failed ({run.returncode}):\n{run.stdout}\n"
                    f"{log.read_text() if log.is_file() else ''}", pytrace=False)
    prefix = root / "install" / PKG
    return SimpleNamespace(root=root, prefix=prefix, share=prefix / "share" / PKG,
                           site=prefix / "lib" / PYVER / "site-packages" / PKG,
                           lib=prefix / "lib" / PKG, setup=root / "install" / "setup.bash",
                           written_to_repo=None if before is None else sorted(after - before))


def sourced(ws, command: str) -> str:
    """`command` in bash under the workspace's sourced setup (the venv's python first on PATH)."""
    return (f"export PATH={shlex.quote(str(BIN))}:\"$PATH\" && source {shlex.quote(str(ws.setup))} && "
            f"{command}")


def assert_same_files(installed: Path, repo_files: list[Path]) -> None:
    missing = [str(f.relative_to(ROOT)) for f in repo_files if not (installed / f.name).is_file()]
    assert not missing, f"not installed in {installed} (setup.py data_files/package_data?): {missing}"
    differ = [str(f.relative_to(ROOT)) for f in repo_files if not filecmp.cmp(f, installed / f.name, shallow=False)]
    assert not differ, f"installed copies differ from the repository's: {differ}"


def files_in(folder: Path, pattern: str = "*") -> list[Path]:
    return sorted(p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith("."))


def test_the_build_writes_nothing_into_the_checkout(ws):
    if ws.written_to_repo is None:
        pytest.skip("the checkout is no git repository")
    assert ws.written_to_repo == [], "colcon build wrote into the source tree"


def test_share_holds_package_xml_launch_files_parameter_files_rviz_and_dds_profiles(ws):
    assert (ws.prefix / "share" / "ament_index" / "resource_index" / "packages" / PKG).is_file()
    assert_same_files(ws.share, [ROOT / "package.xml"])
    launch = files_in(ROOT / "launch", "*.launch.py")
    config = [p for pattern in ("*.yaml", "*.rviz", "*.xml") for p in files_in(ROOT / "config", pattern)]
    names = {p.name for p in config}
    assert launch and {"anomaly.rviz", "fastdds_large_frames.xml", "cyclonedds_large_frames.xml"} <= names
    assert_same_files(ws.share / "launch", launch)
    assert_same_files(ws.share / "config", config)


def test_package_data_holds_the_shipped_model_and_taef2_with_its_licence(ws):
    models = ROOT / PKG / "models"
    default, taef2 = files_in(models / "default"), files_in(models / "taef2")
    assert {"config.json", "MODEL_CARD.md"} <= {p.name for p in default}
    assert {"LICENSE", "README.md"} <= {p.name for p in taef2}
    assert any(p.suffix == ".safetensors" for p in default) and any(p.suffix == ".safetensors" for p in taef2)
    assert_same_files(ws.site / "models" / "default", default)
    assert_same_files(ws.site / "models" / "taef2", taef2)
    # and every module of the package (a subpackage without __init__.py escapes find_packages)
    modules = sorted(str(p.relative_to(ROOT / PKG)) for p in (ROOT / PKG).rglob("*.py"))
    assert [m for m in modules if not (ws.site / m).is_file()] == []


def test_lookups_of_ros2_run_and_ros2_launch_resolve_to_the_install(ws):
    """Run where the source tree is not on sys.path (cwd: the workspace), as on a robot."""
    script = (
        "import json\n"
        "import ros_anomaly_diffusion\n"
        "from ament_index_python.packages import get_package_prefix, get_package_share_directory\n"
        "from ros_anomaly_diffusion.config import variant_params_file\n"
        "from ros_anomaly_diffusion.core.checkpoint import DEFAULT_MODEL\n"
        "from ros_anomaly_diffusion.core.settings import VARIANT_NAMES\n"
        f"pkg = {PKG!r}\n"
        "print(json.dumps({'module': ros_anomaly_diffusion.__file__, 'prefix': get_package_prefix(pkg),\n"
        "                  'share': get_package_share_directory(pkg), 'default_model': str(DEFAULT_MODEL),\n"
        "                  'variants': {v: str(variant_params_file(v)) for v in VARIANT_NAMES}}))\n")
    run = subprocess.run(["bash", "-c", sourced(ws, f"exec python -c {shlex.quote(script)}")], cwd=ws.root,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(got["module"]) == ws.site / "__init__.py", "the package was not imported from the install"
    assert Path(got["default_model"]) == ws.site / "models" / "default"
    assert Path(got["prefix"]) == ws.prefix
    assert Path(got["share"]) == ws.share  # ros2 launch ros_anomaly_diffusion <file>: share/<pkg>/launch/<file>
    from ros_anomaly_diffusion.core.settings import VARIANT_NAMES

    assert got["variants"] == {v: str(ws.share / "config" / f"{v}.yaml") for v in VARIANT_NAMES}
    # ros2 run ros_anomaly_diffusion <exe>: an executable in <prefix>/lib/<pkg>
    for exe in ("detector_node", "replay_node"):
        assert os.access(ws.lib / exe, os.X_OK), f"{ws.lib / exe} missing or not executable (setup.cfg script_dir?)"


def test_the_installed_node_answers_a_rugd_frame_with_the_shipped_model(ws, spawn_module, probe_module, rugd_sample):
    from ros_anomaly_diffusion.core.data import open_dataset

    # The DDS profile conftest points every process at comes from the source tree: the
    # installed node is left to find its own, in the install's share/.
    ours = [k for k in ("FASTDDS_DEFAULT_PROFILES_FILE", "CYCLONEDDS_URI")
            if str(ROOT / "config") in os.environ.get(k, "")]
    ns, topic = "/colcon", "/colcon_cam/image_raw"
    node = spawn_module(shutil.which("bash"), "-c", sourced(
        ws, f"{''.join(f'unset {k} && ' for k in ours)}exec {shlex.quote(str(ws.lib / 'detector_node'))} "
            f"--ros-args -r image:={topic} -r __ns:={ns}"))
    node.wait_for_output(f"listening on {re.escape(topic)}", timeout=180)  # the model loads first
    assert f"using the model shipped with the package, {ws.site / 'models' / 'default'}" in node.output
    assert "variant knn" in node.output
    if ours:
        node.wait_for_output(rf"DDS settings for camera-sized frames: \S+=\S*{re.escape(str(ws.share / 'config'))}/",
                             timeout=1)

    boxes = {name: probe_module.collect(t, f"{ns}/anomaly/{name}")
             for name, t in {"mask": Image, "score": Image, "ood_stamped": DiagnosticArray}.items()}
    pub = probe_module.publisher(Image, topic, depth=1)
    probe_module.wait_for_subscriber(pub, timeout=60)
    rgb = open_dataset(rugd_sample)[0].rgb()
    mask_msg = send_until(probe_module, pub, boxes["mask"], stamped_image(rgb, 4242, 7, "rugd_cam"),
                          timeout=180, resend=5.0)
    stamp = stamp_of(mask_msg)
    assert stamp == (4242, 7) and mask_msg.header.frame_id == "rugd_cam"
    probe_module.spin_until(lambda: all(by_stamp(boxes[k], stamp) for k in ("score", "ood_stamped")), 30,
                            "the score and ood_stamped of the frame")
    mask, score = as_array(mask_msg), as_array(by_stamp(boxes["score"], stamp)[0])
    assert mask.shape == score.shape == rgb.shape[:2]
    assert set(np.unique(mask)) <= {0, 255} and np.isfinite(score).all()
    assert node.alive() and "Traceback" not in node.output
    assert node.sigint(timeout=30) == 0, node.output  # bash exec'd the node: the signal reaches it
