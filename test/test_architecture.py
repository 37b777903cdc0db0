"""The package's import structure: no cycles among its modules, no ROS inside the core.

Read from the source with `ast` (nothing is imported), counting imports at module level
and inside functions alike: an import moved into a function to dodge a cycle still is
a dependency and shows up here.
"""
from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "ros_anomaly_diffusion"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
# Top-level names of ROS client libraries, launch and the ament index; *_msgs and *_srvs
# (message and service packages) are matched by suffix.
ROS = {"rclpy", "rcl_interfaces", "launch", "launch_ros", "ament_index_python"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(module: str, path: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import statement in the file, at any depth."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[:len(module.split(".")) - node.level + is_package]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            # `from . import checkpoint` names a module; `from .settings import Settings` does not
            out += [(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base, node.lineno) for a in node.names]
    return out


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        # An import of a.b.c also runs a/__init__ and a/b/__init__; those only hold docstrings,
        # so the edges that matter are to the named module itself.
        graph[module] = {name for name, _ in _imports(module, path) if name in MODULES and name != module}
    return graph


def test_the_graph_sees_the_package():
    graph = _graph()
    assert f"{PACKAGE}.core.detector" in graph
    assert f"{PACKAGE}.core.settings" in graph[f"{PACKAGE}.core.detector"]
    # function-level imports count: the CLI imports the core's modules inside its commands
    assert f"{PACKAGE}.engine.evaluation" in graph[f"{PACKAGE}.cli"]


def _in_cycles(graph: dict[str, set[str]]) -> set[str]:
    """Modules on some import cycle: those that reach themselves."""
    def reach(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph[m]
        return seen

    return {m for m in graph if m in reach(m)}


def test_no_import_cycle_among_package_modules():
    graph = _graph()
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        # graphlib lists each module before the one that imports it: reversed, it reads as "imports"
        pytest.fail("import cycle: " + " imports ".join(reversed(err.args[1])) + "\nall modules on cycles: "
                    + ", ".join(sorted(_in_cycles(graph))))


def test_core_imports_no_ros():
    bad = []
    for module, path in MODULES.items():
        if not module.startswith(f"{PACKAGE}.core"):
            continue
        for name, line in _imports(module, path):
            top = name.split(".")[0]
            if top in ROS or top.endswith(("_msgs", "_srvs")) or name.startswith(f"{PACKAGE}.ros"):
                bad.append(f"{path.relative_to(ROOT.parent)}:{line}: {name}")
    assert not bad, "ROS imports inside the ROS-free core:\n" + "\n".join(bad)


def test_layers_import_only_downwards():
    """core (models) <- engine (orchestration, parameter files) <- ros (adapters) and the CLI; inside
    the core, the variant registry on top of the families and networks, the Detector on top of it."""
    core = f"{PACKAGE}.core"
    below = {  # module prefix -> package modules it must not import
        core: (f"{PACKAGE}.engine", f"{PACKAGE}.ros", f"{PACKAGE}.config", f"{PACKAGE}.cli"),
        f"{PACKAGE}.engine": (f"{PACKAGE}.ros", f"{PACKAGE}.cli"),
        f"{core}.families": (f"{core}.variants", f"{core}.detector", f"{core}.runtime"),
        f"{core}.networks": (f"{core}.families", f"{core}.variants", f"{core}.detector", f"{core}.samplers"),
        f"{core}.samplers": (f"{core}.networks", f"{core}.families", f"{core}.variants"),
    }
    bad = [f"{module} imports {name}" for module, deps in _graph().items() for prefix, banned in below.items()
           if module.startswith(prefix) for name in deps if name.startswith(banned)]
    assert not bad, "\n".join(bad)


def test_every_family_module_implements_the_family_interface():
    from ros_anomaly_diffusion.core.scorer import Family
    from ros_anomaly_diffusion.core.variants import VARIANTS

    wanted = [n for n in vars(Family) if not n.startswith("_")] + ["FAMILY"]
    for variant in VARIANTS.values():
        missing = [n for n in wanted if not hasattr(variant.module, n)]
        assert not missing, f"{variant.module.__name__} lacks {missing}"
        assert variant.module.__name__.startswith(f"{PACKAGE}.core.families.")


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", PACKAGE, "--help"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT.parent)
    assert out.returncode == 0, out.stderr
    assert "usage: ros-anomaly-diffusion" in out.stdout


@pytest.mark.parametrize("variant", ["ddpm", "ddim", "inversion", "feature_edit", "knn", "dcae"])
def test_every_variant_builds_a_scorer_that_maps_frames_to_maps(variant, short_checkpoint, family_checkpoint):
    import torch

    from ros_anomaly_diffusion.config import variant_settings
    from ros_anomaly_diffusion.core import checkpoint as ckpt
    from ros_anomaly_diffusion.core.scorer import Scorer, ScoreOutput
    from ros_anomaly_diffusion.core.variants import get_variant

    v = get_variant(variant)
    directory = short_checkpoint if v.family == "pixel" else family_checkpoint(v.family)
    config = ckpt.load_config(directory)
    settings = variant_settings(variant, checkpoint=str(directory), analysis_height=48, analysis_width=64)
    scorer = v.build(directory, config, settings, torch.device("cpu"))
    assert isinstance(scorer, Scorer) and isinstance(scorer, torch.nn.Module) and scorer.nfe >= 0
    # the trained networks it runs are its submodules (one module per family, as anomalib's torch_model)
    held = {id(m) for m in scorer.modules()}
    assert all(id(net) in held for net in scorer.networks().values()), variant
    out = scorer(torch.rand(2, 3, *config["image_size"], generator=torch.Generator().manual_seed(0)))
    assert isinstance(out, ScoreOutput) and out.maps.shape == (2, 48, 64)
    assert float(out.maps.min()) >= 0 and float(out.maps.max()) <= 1
    assert (out.edited01 is not None) == (variant in ("ddpm", "ddim", "dcae"))  # feature_edit has no image
