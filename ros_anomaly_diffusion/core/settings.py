"""Run-time settings of the detector: one table that the CLI, the config files and the
ROS node (parameter declarations, descriptions, ranges, validation) all read.
Reading the config files (ROS parameter-file layout) is ros_anomaly_diffusion/config.py's."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from .temporal import FlagFilterConfig

# The variant names the registry (core/variants.py) implements, and those without a
# denoiser for `quantization` to act on. The registry sits above this module and checks
# on import that it matches; knowing them here lets Settings validate without importing it.
VARIANT_NAMES = ("ddpm", "ddim", "inversion", "feature_edit", "knn", "dcae")
WITHOUT_DENOISER = frozenset({"knn"})

# Settings that take effect on the next frame without rebuilding the model.
LIVE = {"mask_threshold", "frame_threshold", "steps", "start_timestep", "guidance_scale", "reconstruction_guidance",
        "edit_score", "draws",
        "ddpm_guidance_scale", "seed", "overlay_alpha", "inversion_steps", "flag_window", "flag_raise_count",
        "flag_clear_count", "flag_hysteresis", "score_ema_alpha"}


def _f(default, description: str, lo=None, hi=None, choices=None):
    return field(default=default, metadata=dict(description=description, lo=lo, hi=hi, choices=choices))


@dataclass
class Settings:
    # Empty: the variant the checkpoint was trained for (the shipped model's is knn, the variant
    # that measured best on frames it never saw: docs/results.md)
    variant: str = _f("", "optimization variant, a name in the registry of core/variants.py; empty: the variant "
                          "the checkpoint was trained for (knn for the model shipped with the package)")
    checkpoint: str = _f("", "checkpoint folder (config.json + .safetensors files); empty: the model shipped with "
                             "the package (knn on the RUGD sample, models/default/MODEL_CARD.md)")
    device: str = _f("cpu", "torch device: cpu, cuda or cuda:N", choices=None)
    cuda_fallback: bool = _f(True, "when CUDA is asked for but absent: true runs on CPU with a warning, "
                                   "false refuses to start")
    steps: int = _f(25, "DDIM steps (number of network evaluations)", 1, 1000)
    start_timestep: int = _f(999, "timestep the input is noised to before editing (lower: weaker edit, faster)",
                             1, 999)
    guidance_scale: float = _f(0.6, "DDIM timestep-matching guidance w (the input's weight in x0 is w(1-abar), "
                                    "capped at 1: very strong guidance returns the input)", 0.0, 1e6)
    reconstruction_guidance: float = _f(0.0, "editing variants: guidance w of the model's own reconstruction of "
                                             "the frame (same sampler and seed) that the edit is compared with, so "
                                             "what the model cannot reproduce anywhere does not count; 0: compare "
                                             "with the frame itself", 0.0, 1e6)
    edit_score: str = _f("edit", "editing variants' score per location: edit (distance between the guided DDIM "
                                 "edit and the reconstruction, or the frame) or error (the denoising error "
                                 "||eps - eps_theta||^2 at start_timestep: one network call; feature_edit and dcae)",
                         choices=("edit", "error"))
    draws: int = _f(1, "editing variants: seeded noise draws K averaged into the score, batched into one network "
                       "call per step", 1, 64)
    ddpm_guidance_scale: float = _f(3000.0, "DDPM baseline guidance s of log r = -s mean((mu - x)^2)",
                                    0.0, 1e7)
    seed: int = _f(0, "noise seed (editing is deterministic given the seed)", 0, 2**31 - 1)
    analysis_height: int = _f(176, "height the feature comparison runs at", 32, 2048)
    analysis_width: int = _f(216, "width the feature comparison runs at", 32, 2048)
    segments: str = _f("auto", "segment aggregation: auto (SAM if sam_checkpoint, else superpixels), sam, "
                               "superpixel or none", choices=("auto", "sam", "superpixel", "none"))
    sam_checkpoint: str = _f("", "SAM weights as .safetensors (empty: no SAM)")
    sam_model_type: str = _f("vit_b", "SAM architecture of sam_checkpoint", choices=("vit_b", "vit_l", "vit_h"))
    mask_threshold: float = _f(-1.0, "pixel score above which a pixel is anomalous; -1: calibrated value "
                                     "stored in the checkpoint", -1.0, 1.0)
    frame_threshold: float = _f(-1.0, "frame score above which the OOD flag is raised; -1: calibrated value "
                                      "stored in the checkpoint", -1.0, 1.0)
    overlay_alpha: float = _f(0.5, "opacity of the anomaly colouring in the overlay image", 0.0, 1.0)
    quantization: str = _f("none", "weight-only quantization of the denoiser at load time (a checkpoint "
                                   "written by `quantize` is already quantized)", choices=("none", "fp16", "int8"))
    quantize_layers: str = _f("selected", "layers to quantize: selected (attention projections, ResNet convs, "
                                          "DiT feed-forward layers) or all", choices=("selected", "all"))
    inversion_steps: int = _f(3, "DDIM inversion steps S of the inversion variant", 1, 50)
    backend: str = _f("auto", "where the networks run: auto (tensorrt on CUDA where torch_tensorrt imports and the "
                              "family runs on it, onnxruntime on a CPU, torch otherwise; the node logs the choice and "
                              "/diagnostics shows it), torch (eager), onnxruntime or openvino (CPU; each network "
                              "exported to ONNX once, cached in ~/.cache/ros_anomaly_diffusion/onnx) or tensorrt "
                              "(CUDA and torch_tensorrt; the pixel family's denoiser)",
                      choices=("auto", "torch", "onnxruntime", "openvino", "tensorrt"))
    precision: str = _f("fp32", "arithmetic of the networks on backend openvino: fp32, or bf16 (about 2x faster "
                                "on CPUs with AMX or AVX512-BF16; scores within ~0.02); tensorrt always runs fp16",
                        choices=("fp32", "bf16"))
    # The filtered OOD flag (core/temporal.py) over a stream of frames: what a planner acts on.
    flag_window: int = _f(5, "filtered OOD flag: frames n it looks back over to raise", 1, 100)
    flag_raise_count: int = _f(3, "filtered OOD flag: raised when at least this many (k) of the last flag_window "
                                  "frame scores are above frame_threshold (1 of 1: per frame)", 1, 100)
    flag_clear_count: int = _f(3, "filtered OOD flag: cleared after this many consecutive frame scores at or below "
                                  "frame_threshold - flag_hysteresis", 1, 100)
    flag_hysteresis: float = _f(0.05, "filtered OOD flag: the clear level is this far below frame_threshold",
                                0.0, 1.0)
    score_ema_alpha: float = _f(1.0, "weight of the newest score map in an exponential moving average that the "
                                     "anomaly points use (1: no smoothing); the published score map is never "
                                     "smoothed", 0.01, 1.0)

    def updated(self, **changes: Any) -> "Settings":
        new = replace(self, **changes)
        new.validate()
        return new

    def flag_filter(self) -> FlagFilterConfig:
        return FlagFilterConfig(window=self.flag_window, raise_count=self.flag_raise_count,
                                clear_count=self.flag_clear_count, hysteresis=self.flag_hysteresis)

    def validate(self) -> None:
        for f in fields(self):
            problem = check(f.name, getattr(self, f.name))
            if problem:
                raise ValueError(problem)
        if self.flag_raise_count > self.flag_window:
            raise ValueError(f"flag_raise_count ({self.flag_raise_count}) must not exceed flag_window "
                             f"({self.flag_window}): the flag could never be raised")
        if self.precision != "fp32" and self.backend != "openvino":
            raise ValueError(f"precision={self.precision!r} runs on backend 'openvino' only (backend is "
                             f"{self.backend!r}): set precision to 'fp32' or backend to 'openvino'")
        if self.quantization != "none" and self.variant in WITHOUT_DENOISER:  # refused, not silently ignored
            raise ValueError(f"quantization={self.quantization!r}: variant {self.variant!r} has no denoiser "
                                 "to quantize (set quantization to 'none')")

    @classmethod
    def from_dict(cls, values: dict) -> "Settings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown settings {unknown}; known: {sorted(known)}")
        s = cls(**values)
        s.validate()
        return s


def spec(name: str) -> dict:
    for f in fields(Settings):
        if f.name == name:
            return dict(f.metadata, default=f.default, type=f.type)
    raise KeyError(name)


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
    try:
        meta = spec(name)
    except KeyError:
        return f"unknown setting {name!r}"
    if name == "variant":
        reason = check_value(name, value, meta["default"])
        if reason is None and value and value not in VARIANT_NAMES:
            reason = f"unknown variant {value!r}; registered: {sorted(VARIANT_NAMES)} (empty: the checkpoint's)"
        return reason
    reason = check_value(name, value, meta["default"], meta["lo"], meta["hi"], meta["choices"])
    if reason is None and name in ("mask_threshold", "frame_threshold") and value != -1.0 and not 0.0 <= value <= 1.0:
        reason = f"{name} must be in [0, 1] (or -1 for the calibrated value), got {value!r}"
    return reason

