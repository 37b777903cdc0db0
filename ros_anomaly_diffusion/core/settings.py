"""Run-time settings of the detector: one table that the CLI, the config files and the
ROS node (parameter declarations, descriptions, ranges, validation) all read.

The fields are grouped into sections (`Settings.sampler`, `.compute`, `.geometry`, `.post`,
`.temporal`), each a dataclass its readers take whole; every field keeps one flat name, unique
across sections, which is its ROS parameter, its key in the parameter files and its keyword in
`Settings.of`/`updated`. Reading the config files (ROS parameter-file layout) is
ros_anomaly_diffusion/config.py's."""
from __future__ import annotations

from dataclasses import Field, dataclass, field, fields, replace
from typing import Any

from .temporal import FlagFilterConfig

# The variant names the registry (core/variants.py) implements, and those without a
# denoiser for `quantization` to act on. The registry sits above this module and checks
# on import that it matches; knowing them here lets Settings validate without importing it.
VARIANT_NAMES = ("ddpm", "ddim", "inversion", "feature_edit", "knn", "dcae")
WITHOUT_DENOISER = frozenset({"knn"})
DDPM_REFERENCES = ("frame", "noised", "prediction")  # what the DDPM baseline's guidance compares (Editor.ddpm)


def _f(default, description: str, lo=None, hi=None, choices=None, live: bool = False):
    """A setting: `live` ones take effect on the next frame, the others rebuild the model."""
    return field(default=default, metadata=dict(description=description, lo=lo, hi=hi, choices=choices, live=live))


@dataclass(frozen=True)
class SamplerSettings:
    """What an editing or inverting variant runs on a frame (samplers.EditSampler reads it)."""
    steps: int = _f(25, "DDIM steps (number of network evaluations)", 1, 1000, live=True)
    start_timestep: int = _f(999, "timestep the input is noised to before editing (lower: weaker edit, faster)",
                             1, 999, live=True)
    guidance_scale: float = _f(0.6, "DDIM timestep-matching guidance w (the input's weight in x0 is w(1-abar), "
                                    "capped at 1: very strong guidance returns the input)", 0.0, 1e6, live=True)
    reconstruction_guidance: float = _f(0.0, "editing variants: guidance w of the model's own reconstruction of "
                                             "the frame (same sampler and seed) that the edit is compared with, so "
                                             "what the model cannot reproduce anywhere does not count; 0: compare "
                                             "with the frame itself", 0.0, 1e6, live=True)
    edit_score: str = _f("edit", "editing variants' score per location: edit (distance between the guided DDIM "
                                 "edit and the reconstruction, or the frame) or error (the denoising error "
                                 "||eps - eps_theta||^2 at start_timestep: one network call; feature_edit and dcae)",
                         choices=("edit", "error"), live=True)
    draws: int = _f(1, "editing variants: seeded noise draws K averaged into the score, batched into one network "
                       "call per step", 1, 64, live=True)
    ddpm_guidance_scale: float = _f(3000.0, "DDPM baseline guidance s of log r = -s mean((mu - x)^2)",
                                    0.0, 1e7, live=True)
    ddpm_guidance_reference: str = _f("frame", "what the DDPM baseline's guidance pulls towards the frame: frame "
                                               "(the step's mean, the paper's), noised (the mean towards the frame "
                                               "at the mean's noise level, the q-transform) or prediction (the "
                                               "network's clean estimate, the p-transform)",
                                      choices=DDPM_REFERENCES, live=True)
    seed: int = _f(0, "noise seed (editing is deterministic given the seed)", 0, 2**31 - 1, live=True)
    inversion_steps: int = _f(3, "DDIM inversion steps S of the inversion variant", 1, 50, live=True)


@dataclass(frozen=True)
class ComputeSettings:
    """Where and how the networks run: device, weight quantization, backend."""
    device: str = _f("cpu", "torch device: cpu, cuda or cuda:N")
    cuda_fallback: bool = _f(True, "when CUDA is asked for but absent: true runs on CPU with a warning, "
                                   "false refuses to start")
    quantization: str = _f("none", "weight-only quantization of the denoiser at load time (a checkpoint "
                                   "written by `quantize` is already quantized)", choices=("none", "fp16", "int8"))
    quantize_layers: str = _f("selected", "layers to quantize: selected (attention projections, ResNet convs, "
                                          "DiT feed-forward layers) or all", choices=("selected", "all"))
    backend: str = _f("auto", "where the networks run: auto (tensorrt on CUDA where torch_tensorrt imports and the "
                              "family runs on it, onnxruntime on a CPU, torch otherwise; the node logs the choice and "
                              "/diagnostics shows it), torch (eager), onnxruntime or openvino (CPU; each network "
                              "exported to ONNX once, cached in ~/.cache/ros_anomaly_diffusion/onnx) or tensorrt "
                              "(CUDA and torch_tensorrt; the pixel family's denoiser)",
                      choices=("auto", "torch", "onnxruntime", "openvino", "tensorrt"))
    precision: str = _f("fp32", "arithmetic of the networks on backend openvino: fp32, or bf16 (about 2x faster "
                                "on CPUs with AMX or AVX512-BF16; scores within ~0.02); tensorrt always runs fp16",
                        choices=("fp32", "bf16"))


@dataclass(frozen=True)
class GeometrySettings:
    """The size a frame is analysed at (the score map is then resized to the frame's)."""
    analysis_height: int = _f(176, "height the feature comparison runs at", 32, 2048)
    analysis_width: int = _f(216, "width the feature comparison runs at", 32, 2048)

    @property
    def size(self) -> tuple[int, int]:
        return self.analysis_height, self.analysis_width


@dataclass(frozen=True)
class PostSettings:
    """From a score map to the outputs: segment aggregation, thresholds, overlay."""
    segments: str = _f("auto", "segment aggregation: auto (SAM if sam_checkpoint, else superpixels), sam, "
                               "superpixel or none", choices=("auto", "sam", "superpixel", "none"))
    sam_checkpoint: str = _f("", "SAM weights as .safetensors (empty: no SAM)")
    sam_model_type: str = _f("vit_b", "SAM architecture of sam_checkpoint", choices=("vit_b", "vit_l", "vit_h"))
    mask_threshold: float = _f(-1.0, "pixel score above which a pixel is anomalous; -1: calibrated value "
                                     "stored in the checkpoint", -1.0, 1.0, live=True)
    frame_threshold: float = _f(-1.0, "frame score above which the OOD flag is raised; -1: calibrated value "
                                      "stored in the checkpoint", -1.0, 1.0, live=True)
    overlay_alpha: float = _f(0.5, "opacity of the anomaly colouring in the overlay image", 0.0, 1.0, live=True)


@dataclass(frozen=True)
class TemporalSettings:
    """Over a stream of frames (core/temporal.py): the filtered OOD flag a planner acts on, and
    the smoothing of the score map the anomaly points use."""
    flag_window: int = _f(5, "filtered OOD flag: frames n it looks back over to raise", 1, 100, live=True)
    flag_raise_count: int = _f(3, "filtered OOD flag: raised when at least this many (k) of the last flag_window "
                                  "frame scores are above frame_threshold (1 of 1: per frame)", 1, 100, live=True)
    flag_clear_count: int = _f(3, "filtered OOD flag: cleared after this many consecutive frame scores at or below "
                                  "frame_threshold - flag_hysteresis", 1, 100, live=True)
    flag_hysteresis: float = _f(0.05, "filtered OOD flag: the clear level is this far below frame_threshold",
                                0.0, 1.0, live=True)
    score_ema_alpha: float = _f(1.0, "weight of the newest score map in an exponential moving average that the "
                                     "anomaly points use (1: no smoothing); the published score map is never "
                                     "smoothed", 0.01, 1.0, live=True)

    def flag_filter(self) -> FlagFilterConfig:
        return FlagFilterConfig(window=self.flag_window, raise_count=self.flag_raise_count,
                                clear_count=self.flag_clear_count, hysteresis=self.flag_hysteresis)


EAGER = ComputeSettings(backend="torch")  # unquantized, torch eager, fp32: how tools load a network

SECTIONS = {"sampler": SamplerSettings, "compute": ComputeSettings, "geometry": GeometrySettings,
            "post": PostSettings, "temporal": TemporalSettings}


@dataclass(frozen=True)
class Settings:
    # Empty: the variant the checkpoint was trained for (the shipped model's is knn, the variant
    # that measured best on frames it never saw: docs/results.md)
    variant: str = _f("", "optimization variant, a name in the registry of core/variants.py; empty: the variant "
                          "the checkpoint was trained for (knn for the model shipped with the package)")
    checkpoint: str = _f("", "checkpoint folder (config.json + .safetensors files); empty: the model shipped with "
                             "the package (knn on the RUGD sample, models/default/MODEL_CARD.md)")
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    compute: ComputeSettings = field(default_factory=ComputeSettings)
    geometry: GeometrySettings = field(default_factory=GeometrySettings)
    post: PostSettings = field(default_factory=PostSettings)
    temporal: TemporalSettings = field(default_factory=TemporalSettings)

    @classmethod
    def of(cls, **flat: Any) -> "Settings":
        """Settings from flat names (`Settings.of(steps=5, segments="none")`), validated."""
        return cls().updated(**flat)

    @classmethod
    def from_dict(cls, values: dict) -> "Settings":
        return cls.of(**values)

    def updated(self, **flat: Any) -> "Settings":
        """These settings with the named fields (flat names) changed; validated."""
        unknown = sorted(set(flat) - set(SECTION_OF))
        if unknown:
            raise ValueError(f"unknown settings {unknown}; known: {sorted(SECTION_OF)}")
        top = {n: v for n, v in flat.items() if SECTION_OF[n] is None}
        for section in SECTIONS:
            changes = {n: v for n, v in flat.items() if SECTION_OF[n] == section}
            if changes:
                top[section] = replace(getattr(self, section), **changes)
        new = replace(self, **top)
        new.validate()
        return new

    def flat(self) -> dict[str, Any]:
        """Every field by its flat name (the ROS parameters' values)."""
        return {n: getattr(self if s is None else getattr(self, s), n) for n, s in SECTION_OF.items()}

    def differences(self, other: "Settings") -> dict[str, Any]:
        """The fields (flat names) whose value in `other` differs from this one's -> other's values."""
        mine, theirs = self.flat(), other.flat()
        return {n: v for n, v in theirs.items() if v != mine[n]}

    def validate(self) -> None:
        for name, value in self.flat().items():
            problem = check(name, value)
            if problem:
                raise ValueError(problem)
        t, c = self.temporal, self.compute
        if t.flag_raise_count > t.flag_window:
            raise ValueError(f"flag_raise_count ({t.flag_raise_count}) must not exceed flag_window "
                             f"({t.flag_window}): the flag could never be raised")
        if c.precision != "fp32" and c.backend != "openvino":
            raise ValueError(f"precision={c.precision!r} runs on backend 'openvino' only (backend is "
                             f"{c.backend!r}): set precision to 'fp32' or backend to 'openvino'")
        if c.quantization != "none" and self.variant in WITHOUT_DENOISER:  # refused, not silently ignored
            raise ValueError(f"quantization={c.quantization!r}: variant {self.variant!r} has no denoiser "
                             "to quantize (set quantization to 'none')")


def _leaves() -> dict[str, tuple[str | None, Field]]:
    out = {}
    for f in fields(Settings):
        for section, leaf in [(f.name, g) for g in fields(SECTIONS[f.name])] if f.name in SECTIONS else [(None, f)]:
            if leaf.name in out:  # the flat name is the ROS parameter: it must say which field it sets
                raise TypeError(f"setting {leaf.name!r} is declared twice")
            out[leaf.name] = (section, leaf)
    return out


_LEAVES = _leaves()
SECTION_OF: dict[str, str | None] = {n: s for n, (s, _) in _LEAVES.items()}  # flat name -> its section
NAMES = tuple(_LEAVES)  # every setting's flat name, in declaration order


def spec(name: str) -> dict:
    """A setting's metadata (description, lo, hi, choices, live), default and type."""
    f = _LEAVES[name][1]
    return dict(f.metadata, default=f.default, type=f.type)


def is_live(name: str) -> bool:
    """Whether setting `name` takes effect on the next frame (False: the model is rebuilt)."""
    return spec(name)["live"]


def check_value(name: str, value: Any, default: Any, lo=None, hi=None, choices=None) -> str | None:
    """Reason why `value` is not acceptable for an option like `default` (its type; an integer
    passes for a float) with the range lo <= value <= hi (either may be None) and choices, or
    None: the one rule of settings, node parameters and training options."""
    if isinstance(default, bool) != isinstance(value, bool) or not isinstance(value, type(default)) and not (
            isinstance(default, float) and isinstance(value, int)):
        return f"{name} must be a {type(default).__name__}, got {value!r}"
    if choices and value not in choices:
        return f"{name} must be one of {list(choices)}, got {value!r}"
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if lo is not None and hi is not None else (f">= {lo}" if hi is None else f"<= {hi}")
        return f"{name} must be {bound}, got {value!r}"
    return None


def check(name: str, value: Any) -> str | None:
    """Reason why `value` is not acceptable for setting `name`, or None."""
    if name not in _LEAVES:
        return f"unknown setting {name!r}"
    meta = spec(name)
    if name == "variant":
        reason = check_value(name, value, meta["default"])
        if reason is None and value and value not in VARIANT_NAMES:
            reason = f"unknown variant {value!r}; registered: {sorted(VARIANT_NAMES)} (empty: the checkpoint's)"
        return reason
    reason = check_value(name, value, meta["default"], meta["lo"], meta["hi"], meta["choices"])
    if reason is None and name in ("mask_threshold", "frame_threshold") and value != -1.0 and not 0.0 <= value <= 1.0:
        reason = f"{name} must be in [0, 1] (or -1 for the calibrated value), got {value!r}"
    return reason
