"""The deepfake detector as the service runs it: model metadata, the one preprocessing path, backends.

Training, evaluation, the worker and the benchmark all go through this module, so the numbers that
evaluation reports describe exactly what the service does.

A checkpoint is one ``.safetensors`` file: the weights plus a JSON document under the ``dfmod`` key of the
safetensors metadata (:class:`ModelMeta`: architecture, input size, mean/std, class names, decision
threshold, model version). ``dfmod export`` writes the same model in serving formats beside it
(``NAME.onnx``, ``NAME.int8.onnx``, OpenVINO ``NAME.xml``) with a sidecar ``NAME.json`` holding the
metadata and the precisions that passed the acceptance check (see :mod:`dfmod.export`).

**One preprocessing path.** Untrusted bytes are decoded by :func:`dfmod.imaging.decode_image` (straight
towards the model's size), resized to the model input and kept as uint8 HWC (:func:`load_pixels`);
batches of those pixels are what every backend eats. Normalisation (the checkpoint's mean/std) happens in
one place, inside the model: :class:`dfmod.torch_model.ServingModule` for torch, and the same module traced
into the exported ONNX/OpenVINO graph. Nothing here needs torch.

**Backends** (:class:`Predictor`, chosen by ``DFMOD_BACKEND`` / ``DFMOD_PRECISION``): ``torch`` (CPU or
CUDA), ``onnxruntime`` and ``openvino`` (CPU), each at fp32, bf16 (OpenVINO, on CPUs with native bf16) or
int8 (static quantization, only where it passed the acceptance check). ``auto`` takes the fastest
accepted combination installed for the device and says why (:func:`choose_backend`); where a worker starts it
times the two best-ranked ones on the CPU it runs on and keeps the faster (:data:`TRIAL_CANDIDATES`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "dfmod-checkpoint/1"
DEFAULT_ARCH = "mobilenetv4_conv_small"
CLASS_NAMES = ("real", "fake")  # index 1 is "fake": probabilities reported are P(fake)
FAKE_INDEX = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SHIPPED_CHECKPOINT = "mnv4s-faces256.safetensors"
SERVING_FORMAT = "dfmod-serving/1"
BACKENDS = ("torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16", "int8")
# Fastest first, as measured on CPU by `dfmod bench` (model-only, batch 32; see docs/model-card.md):
# auto takes the first one that is installed, present on disk, accepted for the model and supported by the CPU.
CPU_RANKING = (
    ("openvino", "int8"),
    ("onnxruntime", "int8"),
    ("openvino", "bf16"),
    ("openvino", "fp32"),
    ("onnxruntime", "fp32"),
    ("torch", "fp32"),
)
# On CPUs with native bf16 OpenVINO's bf16 beats its int8 at batch 32: with AMX (Sapphire Rapids and later)
# 1367 against 898 img/s (dfmod bench, 2026-12-02), with AVX512-BF16 alone (AMD Zen 4) ahead in 6 of 6
# alternating 4 s runs, 609 against 519 img/s on average (2026-12-02), and in every full bench but one
# since 2026-12-01 (docs/benchmarks.md). Without native bf16 it would be emulated: int8 first there.
BF16_CPU_RANKING = (("openvino", "bf16"), *(pair for pair in CPU_RANKING if pair != ("openvino", "bf16")))


def cpu_ranking() -> tuple[tuple[str, str], ...]:
    """The CPU backends fastest first, for this CPU."""
    return BF16_CPU_RANKING if cpu_has_native_bf16() else CPU_RANKING


# The torch-side names (they import torch): served lazily by __getattr__ below.
_TORCH_NAMES = frozenset(
    {"build_model", "save_checkpoint", "load_checkpoint", "fold_batchnorm", "weights_digest", "pick_device"}
)


class ModelNotAvailable(RuntimeError):
    """No usable checkpoint: said loudly instead of classifying with untrained weights."""


@dataclass
class ModelMeta:
    """Everything needed to rebuild the model and its preprocessing, stored inside the checkpoint."""

    architecture: str = DEFAULT_ARCH
    num_classes: int = 2
    class_names: list[str] = field(default_factory=lambda: list(CLASS_NAMES))
    input_size: list[int] = field(default_factory=lambda: [3, 224, 224])
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    interpolation: str = "bilinear"
    drop_rate: float = 0.2
    threshold: float = 0.5
    threshold_rule: str = "default 0.5"
    model_version: str = "untrained"
    format: str = CHECKPOINT_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)
    # Temperature scaling: P(fake) = sigmoid((logit_fake - logit_real) / temperature). Every threshold stored
    # here (``threshold`` and the operating points) applies to that calibrated probability.
    temperature: float = 1.0
    calibration: dict[str, Any] = field(default_factory=dict)  # how the temperature was fitted, ECE before/after
    # Named thresholds ("fpr_1", "fpr_5", "balanced") with the validation figures they were chosen on.
    operating_points: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of the model input."""
        return (self.input_size[2], self.input_size[1])

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelMeta:
        raw = json.loads(text)
        if raw.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a dfmod checkpoint (format {raw.get('format')!r})")
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in raw.items() if key in known})


def decision_threshold(meta: ModelMeta, operating_point: str | None = None, override: float | None = None) -> float:
    """The threshold the service applies: an explicit ``override``, else the named operating point, else the
    checkpoint's own. An operating point the checkpoint does not hold is an error naming the ones it has."""
    if override is not None:
        return float(override)
    if operating_point:
        point = meta.operating_points.get(operating_point)
        if point is None:
            known = ", ".join(sorted(meta.operating_points)) or "none (run `dfmod calibrate` on it)"
            raise ModelNotAvailable(f"checkpoint {meta.model_version} has no operating point {operating_point!r}; "
                                    f"it has: {known}")
        return float(point["threshold"])
    return float(meta.threshold)


def default_checkpoint_path() -> Path:
    return Path(str(resources.files("dfmod") / "models" / SHIPPED_CHECKPOINT))


def resolve_checkpoint_path(path: Path | None) -> Path:
    """The configured checkpoint, or the shipped one; raises :class:`ModelNotAvailable` if neither exists."""
    candidate = Path(path) if path else default_checkpoint_path()
    if not candidate.is_file():
        hint = (
            "set DFMOD_CHECKPOINT to a checkpoint made by `dfmod train`"
            if path
            else "this install ships no trained model; train one with `dfmod train DATA_DIR --out CKPT` "
            "and set DFMOD_CHECKPOINT"
        )
        raise ModelNotAvailable(f"model checkpoint not found at {candidate}: {hint}")
    return candidate


def __getattr__(name: str):
    if name in _TORCH_NAMES:
        from dfmod import torch_model

        return getattr(torch_model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def model_stem(path: Path) -> str:
    """``mnv4s-faces256`` for ``mnv4s-faces256.safetensors``, ``.onnx``, ``.int8.onnx`` or ``.xml``."""
    return Path(path).name.split(".", 1)[0]


def sidecar_path(path: Path) -> Path:
    return Path(path).parent / f"{model_stem(path)}.json"


def read_sidecar(path: Path) -> dict | None:
    """The serving sidecar written by ``dfmod export`` beside ``path``, or None."""
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return None
    document = json.loads(sidecar.read_text())
    if document.get("format") != SERVING_FORMAT:
        raise ValueError(f"{sidecar} is not a dfmod serving sidecar (format {document.get('format')!r})")
    return document


def read_meta(path: Path) -> ModelMeta:
    """Read only the metadata of a checkpoint or exported model (no torch import, no weights loaded)."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        sidecar = read_sidecar(path)
        if sidecar is None:
            raise ValueError(f"{path} has no sidecar {sidecar_path(path).name}; export it with `dfmod export`")
        return ModelMeta.from_json(json.dumps(sidecar["meta"]))
    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata() or {}
    if "dfmod" not in metadata:
        raise ValueError(f"{path} has no dfmod metadata; is it a dfmod checkpoint?")
    return ModelMeta.from_json(metadata["dfmod"])


# --- the one preprocessing path ----------------------------------------------------------------------


def resize_for_model(image: Image.Image, meta: ModelMeta) -> Image.Image:
    """Resize to the model input (the paper resizes straight to 224x224, without cropping).

    ``reducing_gap`` lets Pillow shrink by an integer factor first (box filter) and resample only the
    last step: a large non-JPEG costs little more than a small one (JPEGs already arrive reduced by the
    decoder's DCT scaling, see :func:`dfmod.imaging.decode_image`).
    """
    size = meta.image_size
    if image.size == size:
        return image
    resample = Image.Resampling.BICUBIC if meta.interpolation == "bicubic" else Image.Resampling.BILINEAR
    return image.resize(size, resample=resample, reducing_gap=3.0)


def to_pixels(image: Image.Image, meta: ModelMeta, out: np.ndarray | None = None) -> np.ndarray:
    """An RGB image as the model's uint8 HWC input: resized, never normalised (the model does that).

    ``out`` is an optional (H, W, 3) uint8 slot, e.g. one row of a preallocated batch, filled in place.
    """
    resized = resize_for_model(image if image.mode == "RGB" else image.convert("RGB"), meta)
    if out is None:
        return np.asarray(resized, dtype=np.uint8)
    out[...] = np.asarray(resized)
    return out


def load_pixels(
    data: bytes, limits, meta: ModelMeta, out: np.ndarray | None = None, budget=None, scaled_jpeg: bool = True
) -> np.ndarray:
    """Untrusted bytes -> the model's uint8 HWC input; raises :class:`dfmod.imaging.ImageRejected`.

    The whole per-image path of the worker and of evaluation: decode (towards the model's size), resize.
    A clean colour JPEG is DCT-scaled by libjpeg-turbo (a 256-px face straight to 224, no resize), every
    other file goes through Pillow (:mod:`dfmod.imaging`); the model card records that the two agree
    (``scaled_jpeg=False``: Pillow for every file, for that comparison, ``scripts/compare_decoders.py``).
    """
    from dfmod.imaging import decode_image, decode_jpeg_scaled

    pixels = decode_jpeg_scaled(data, limits, target=meta.image_size, budget=budget) if scaled_jpeg else None
    if pixels is None:
        return to_pixels(decode_image(data, limits, target=meta.image_size, budget=budget), meta, out)
    width, height = meta.image_size
    if pixels.shape[:2] != (height, width):
        return to_pixels(Image.fromarray(pixels), meta, out)
    if out is None:
        return pixels
    out[...] = pixels
    return out


def stack_pixels(pixels: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """A batch (N, H, W, 3) uint8, contiguous, from a list of HWC images or an existing batch."""
    if isinstance(pixels, np.ndarray) and pixels.ndim == 4:
        return np.ascontiguousarray(pixels, dtype=np.uint8)
    return np.stack(list(pixels)).astype(np.uint8, copy=False)


def fake_probabilities(logits, temperature: float = 1.0) -> np.ndarray:
    """Calibrated P(fake) from (N, 2) logits (numpy, or a torch tensor in training): softmax of logits / T.

    The one place the checkpoint's temperature is applied, whatever backend produced the logits (exported
    models stay uncalibrated graphs; their sidecar carries the temperature). Computed from the logit margin
    in float64, so confident images do not saturate at exactly 0 or 1 before a threshold is applied.
    """
    array = logits.detach().cpu().double().numpy() if hasattr(logits, "detach") else np.asarray(logits, np.float64)
    margin = (array[:, FAKE_INDEX] - array[:, 1 - FAKE_INDEX]) / float(temperature)
    return 0.5 * (1.0 + np.tanh(0.5 * margin))  # the logistic function, overflow-free


# --- backends ----------------------------------------------------------------------------------------


def backend_installed(backend: str) -> bool:
    module = {"torch": "torch", "onnxruntime": "onnxruntime", "openvino": "openvino"}[backend]
    return importlib.util.find_spec(module) is not None


def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without them bf16 is emulated on CPU and slower than fp32."""
    flags = _cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def serving_file(checkpoint: Path, backend: str, precision: str) -> Path | None:
    """The file ``backend`` loads at ``precision`` for this checkpoint, if it is on disk."""
    checkpoint = Path(checkpoint)
    folder, stem = checkpoint.parent, model_stem(checkpoint)
    if backend == "torch":
        candidate = folder / f"{stem}.safetensors"
        return candidate if precision == "fp32" and candidate.is_file() else None
    weights = "int8." if precision == "int8" else ""
    if backend == "onnxruntime" and precision == "bf16":
        return None  # ONNX Runtime's CPU kernels have no bf16 convolutions
    names = [f"{stem}.{weights}onnx"] if backend == "onnxruntime" else [f"{stem}.{weights}xml", f"{stem}.{weights}onnx"]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None


def accepted_precisions(checkpoint: Path) -> dict[str, dict]:
    """Reduced precisions (``onnxruntime-int8``, ...) that passed the acceptance check, with their figures.

    fp32 is the reference and always accepted; it is not listed.
    """
    sidecar = read_sidecar(checkpoint) or {}
    return {name: figures for name, figures in sidecar.get("precisions", {}).items() if figures.get("accepted")}


@dataclass(frozen=True)
class BackendChoice:
    backend: str
    precision: str
    path: Path
    device: str
    reason: str

    @property
    def name(self) -> str:
        return f"{self.backend}-{self.precision}"


def _auto_device(device: str) -> str:
    if device != "auto":
        return device
    # torch is asked only where an NVIDIA driver is loaded: importing it costs a CPU worker seconds and
    # hundreds of MB for nothing.
    if Path("/proc/driver/nvidia/version").exists() and backend_installed("torch"):
        import torch

        if torch.cuda.is_available():
            return "cuda"
    return "cpu"


AUTO_REASON = "auto: fastest accepted one installed for cpu"


def viable_backends(
    checkpoint: Path, backend: str = "auto", precision: str = "auto", device: str = "auto"
) -> tuple[list[BackendChoice], list[str]]:
    """Every combination that can serve ``checkpoint`` as configured, fastest first by :func:`cpu_ranking`, and
    why each of the others cannot (installed, accepted, supported by the CPU, exported)."""
    checkpoint = Path(checkpoint)
    device = _auto_device(device)
    meta = read_meta(checkpoint)
    sidecar = read_sidecar(checkpoint)
    if sidecar and sidecar["meta"].get("model_version") != meta.model_version:
        logger.warning("ignoring the serving files beside %s: they hold model %s, not %s", checkpoint,
                       sidecar["meta"].get("model_version"), meta.model_version)
        sidecar = None
    if device == "cuda":
        if backend not in ("auto", "torch"):
            raise ModelNotAvailable(f"DFMOD_BACKEND={backend} runs on CPU only; use torch (or auto) with CUDA")
        path = serving_file(checkpoint, "torch", "fp32")
        if path is None or not backend_installed("torch"):
            raise ModelNotAvailable("CUDA needs the torch backend and the .safetensors checkpoint (pip install dfmod[gpu])")
        return [BackendChoice("torch", "autocast", path, "cuda", "cuda: torch with bf16/fp16 autocast")], []
    accepted = accepted_precisions(checkpoint) if sidecar else {}
    viable: list[BackendChoice] = []
    skipped: list[str] = []
    how = AUTO_REASON if backend == "auto" and precision == "auto" else "configured"
    for candidate_backend, candidate_precision in cpu_ranking():
        label = f"{candidate_backend}-{candidate_precision}"
        if backend not in ("auto", candidate_backend) or precision not in ("auto", candidate_precision):
            continue
        if not backend_installed(candidate_backend):
            skipped.append(f"{label}: not installed")
            continue
        if candidate_precision == "bf16" and not cpu_has_native_bf16() and precision == "auto":
            skipped.append(f"{label}: CPU has no avx512_bf16/amx")
            continue
        if candidate_precision != "fp32" and label not in accepted:
            if precision == "auto":
                skipped.append(f"{label}: not accepted for {meta.model_version}")
                continue
            logger.warning("%s was not accepted for %s; serving it because DFMOD_PRECISION asks for it", label,
                           meta.model_version)
        path = serving_file(checkpoint, candidate_backend, candidate_precision) if (
            candidate_backend == "torch" or sidecar) else None
        if path is None:
            skipped.append(f"{label}: no exported file beside {checkpoint.name}")
            continue
        reason = how + (f" (skipped {'; '.join(skipped)})" if skipped else "")
        viable.append(BackendChoice(candidate_backend, candidate_precision, path, "cpu", reason))
    return viable, skipped


def choose_backend(checkpoint: Path, backend: str = "auto", precision: str = "auto", device: str = "auto") -> BackendChoice:
    """Which backend and precision serve ``checkpoint``, and why; raises :class:`ModelNotAvailable` if none can."""
    return _serving_candidates(checkpoint, backend, precision, device)[0]


def _serving_candidates(checkpoint: Path, backend: str, precision: str, device: str) -> list[BackendChoice]:
    """:func:`viable_backends`, raising :class:`ModelNotAvailable` with every reason when there is none."""
    viable, skipped = viable_backends(checkpoint, backend, precision, device)
    if not viable:
        raise ModelNotAvailable(
            f"no backend can serve {Path(checkpoint).name} with DFMOD_BACKEND={backend}, DFMOD_PRECISION={precision}: "
            + ("; ".join(skipped) or "no such combination")
            + ". Install an extra (pip install 'dfmod[openvino]' or 'dfmod[training]') or run `dfmod export`."
        )
    return viable


def measure_throughput(run, pixels: np.ndarray, seconds: float, streams: int = 1, min_passes: int = 3) -> tuple[float, float]:
    """(img/s, CPU ms per image) of ``run(pixels)`` called for ``seconds`` (at least ``min_passes`` times per
    stream) from ``streams`` threads at once, as a worker with that many batches in the model runs it."""
    started, cpu_started = time.perf_counter(), time.process_time()

    def stream() -> int:
        done = passes = 0
        while time.perf_counter() - started < seconds or passes < min_passes:
            run(pixels)  # returns on the host: a CUDA batch has finished by then
            done, passes = done + len(pixels), passes + 1
        return done

    if streams == 1:
        done = stream()
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(streams) as pool:
            done = sum(pool.map(lambda _: stream(), range(streams)))
    return done / (time.perf_counter() - started), 1000.0 * (time.process_time() - cpu_started) / done


#: ``auto`` with a trial (the worker's ``DFMOD_BACKEND_TRIAL_S``) times this many of the best-ranked viable
#: combinations on the CPU it runs on. On AVX512-BF16 CPUs without AMX, OpenVINO's bf16 and int8 trade places
#: from one VM to the next and within a day (docs/benchmarks.md: int8 ahead in 12 of 13 benches of 2026-12-05,
#: bf16 in most of 2026-12-02); every other combination measured far behind the first two everywhere.
TRIAL_CANDIDATES = 2
#: A lower-ranked combination replaces a higher-ranked one only when it is this much faster: within it, the
#: ranking's order stands (bf16 keeps more labels of fp32 than int8 does: 99.8 % against 99.7 % on Test).
TRIAL_MARGIN = 0.03
TRIAL_ROUNDS = 4


def _trial(candidates: list[BackendChoice], threads: int | None, streams: int, meta: ModelMeta, batch_size: int,
           seconds: float):
    """Load each candidate and time it at ``batch_size`` with the serving threads and streams; returns (the
    choice, its runner, img/s by candidate).

    A shared VM's speed drifts by tens of percent within seconds, so the candidates are compared in pairs
    timed back to back, in an order that alternates round by round (ABBA cancels a steady drift), and a
    challenger wins on the median of its per-round ratios to the one ahead of it.
    """
    import statistics

    runners = {choice.name: load_runner(choice, threads, streams) for choice in candidates}
    _, height, width = meta.input_size
    pixels = np.random.default_rng(0).integers(0, 256, (batch_size, height, width, 3), dtype=np.uint8)
    # The first passes run slower, int8's for longer (on a Zen 4 VM its img/s at batch 32 settled over about
    # six passes, bf16's over two): a quarter of the trial warms each candidate before anything is timed.
    for runner in runners.values():
        warm_until = time.perf_counter() + seconds / 4 / len(runners)
        runner.logits(pixels)
        while time.perf_counter() < warm_until:
            runner.logits(pixels)
    runs: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for round_index in range(TRIAL_ROUNDS):
        for name in names if round_index % 2 == 0 else names[::-1]:
            runner = runners[name]
            runs[name].append(measure_throughput(runner.logits, pixels, seconds * 3 / 4 / TRIAL_ROUNDS / len(runners),
                                                 runner.streams, min_passes=1)[0])
    img_s = {name: statistics.median(values) for name, values in runs.items()}
    best = candidates[0]
    for challenger in candidates[1:]:
        ratios = [mine / theirs for mine, theirs in zip(runs[challenger.name], runs[best.name], strict=True)]
        if statistics.median(ratios) > 1 + TRIAL_MARGIN:
            best = challenger
    timed = ", ".join(f"{name} {value:.0f} img/s" for name, value in img_s.items())
    reason = (f"auto: timed on this CPU at batch {batch_size}: {timed} (a lower-ranked one wins only when "
              f"{TRIAL_MARGIN:.0%} faster)") + best.reason.removeprefix(AUTO_REASON)
    return replace(best, reason=reason), runners[best.name], img_s


class OnnxRuntimeRunner:
    """The ``onnxruntime`` backend (CPU execution provider) on an exported ``.onnx`` model."""

    backend = "onnxruntime"

    def __init__(self, path: Path, precision: str, threads: int | None = None, streams: int = 1) -> None:
        import onnxruntime as ort

        # session.run may be called from several threads at once; each of ``streams`` concurrent runs gets
        # its share of the threads (one: the run stays on its calling thread, with no pool to hand work to).
        threads = max(1, threads // streams) if threads else None
        self.streams = streams
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle intra-op threads sleep instead of spinning: in a worker the forward pass alternates with fetch
        # and decode on the same cores, and spinning threads burned 2 ms of CPU per image doing nothing
        # (measured: 3.6 vs 5.7-6.2 CPU ms per image at batch 32, same or better throughput).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.precision = precision
        self.device = "cpu"

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: pixels})[0]


_openvino_core = None
_openvino_core_lock = threading.Lock()


def openvino_core():
    """The process's one OpenVINO ``Core``, kept for the life of the process.

    A Core's first compile points the calling thread's signal stack (``sigaltstack``) at memory of its own,
    and a Core that goes away puts back whichever stack it found, even one a Core already gone had freed.
    With a Core per model, discarding one (auto's trial discards the slower; the bench, its model-only
    predictors) could leave the main thread's signal stack dangling; the next signal with a Python handler
    (Celery's warm shutdown on SIGTERM, pytest's timeout alarm) then killed the process with a SIGSEGV the
    kernel raised while delivering it. One Core keeps the stack valid.
    """
    global _openvino_core
    with _openvino_core_lock:
        if _openvino_core is None:
            import openvino as ov

            _openvino_core = ov.Core()
        return _openvino_core


#: OpenVINO's forward passes run on slices of at most this many images. Its CPU plugin runs a batch layer by
#: layer, so each layer's activations for the whole batch pass through the core's caches: on one 2-core Xeon
#: (2 MB of L2 per core, 2026-12-06), int8 at batch 32 ran 10-29 % slower per image than as four slices of 8
#: with one thread per pass (the worker's case on one core, or with a stream per core), and level with two
#: threads; bf16 and fp32 were level either way (ONNX Runtime gained nothing from slices and is not sliced).
#: The rows are the same either way: each image's logits depend on its own pixels only.
OPENVINO_SLICE = 8


def pointwise_convolutions_as_matmuls(model) -> int:
    """Rewrite, in an OpenVINO model, each 1x1 convolution of a 1x1 feature map as a MatMul; returns how many.

    MobileNetV4's ``conv_head`` (960 -> 1280 channels) comes after the global pooling, so it is a matrix
    product per image, but the CPU plugin runs it as a convolution over one pixel: on one thread, 1.58 ms per
    pass of 8 images against 0.31 as a MatMul (5.71 against 0.62 at 32), about 8 % of openvino-int8's forward
    pass (its per-layer profile, 2026-12-06). The arithmetic is the same (fp32 either way: the head is one of
    the layers int8 leaves in fp32), so the logits agree to float rounding.
    """
    import openvino.opset13 as ops

    rewritten = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Convolution":
            continue
        data, kernel = op.input(0).get_partial_shape(), op.input(1).get_partial_shape()
        if data.rank.is_dynamic or data.rank.get_length() != 4 or not kernel.is_static:
            continue
        if any(not dim.is_static or dim.get_length() != 1 for dim in (data[2], data[3])):
            continue
        out_channels, in_channels, height, width = (dim.get_length() for dim in kernel)
        attributes = op.get_attributes()
        if (height, width) != (1, 1) or list(attributes["strides"]) != [1, 1] or any(attributes["pads_begin"]) or any(
            attributes["pads_end"]
        ):
            continue
        rows = ops.reshape(op.input_value(0), np.array([-1, in_channels], np.int64), special_zero=False)
        matrix = ops.reshape(op.input_value(1), np.array([out_channels, in_channels], np.int64), special_zero=False)
        product = ops.matmul(rows, matrix, transpose_a=False, transpose_b=True)
        result = ops.reshape(product, np.array([-1, out_channels, 1, 1], np.int64), special_zero=False)
        result.set_friendly_name(op.get_friendly_name())
        op.output(0).replace(result.output(0))
        rewritten += 1
    return rewritten


class OpenVinoRunner:
    """The ``openvino`` backend on CPU: an OpenVINO IR (``.xml``) or the ``.onnx`` file read directly."""

    backend = "openvino"

    def __init__(
        self, path: Path, precision: str, threads: int | None = None, streams: int = 1, slice_size: int = OPENVINO_SLICE
    ) -> None:
        # One stream: every thread on each forward pass (LATENCY). Several: OpenVINO's streams, each with its
        # share of the threads and an infer request of its own, so forward passes from several threads run
        # side by side without waiting on each other's parallel sections (THROUGHPUT).
        config = {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT",
        }
        if streams > 1:
            config["NUM_STREAMS"] = streams
        if threads:
            config["INFERENCE_NUM_THREADS"] = max(threads, streams)
        core = openvino_core()
        model = core.read_model(str(path))
        self.matmul_rewrites = pointwise_convolutions_as_matmuls(model)
        self.compiled = core.compile_model(model, "CPU", config)
        self.streams = int(self.compiled.get_property("NUM_STREAMS"))
        self._requests: queue.SimpleQueue = queue.SimpleQueue()  # calls from more threads than streams wait
        for _ in range(self.streams):
            self._requests.put(self.compiled.create_infer_request())
        self.output = self.compiled.output(0)
        self.precision = precision
        self.device = "cpu"
        self.slice_size = max(1, slice_size)

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        request = self._requests.get()
        try:
            if len(pixels) <= self.slice_size:
                return np.array(request.infer({0: pixels})[self.output], dtype=np.float32, copy=True)
            out = np.empty((len(pixels), self.output.get_partial_shape()[1].get_length()), dtype=np.float32)
            for start in range(0, len(pixels), self.slice_size):
                stop = start + self.slice_size
                out[start:stop] = request.infer({0: pixels[start:stop]})[self.output]
            return out
        finally:
            self._requests.put(request)


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """CPUs this process may use: its affinity mask (taskset, a cpuset), capped by a cgroup v2 CPU quota.

    The default intra-op thread count of every backend. Left to themselves they count the machine's cores:
    onnxruntime then pins a thread to each, outside the process's mask (under ``taskset -c 0`` on two cores
    it ran on both, 1.85 cores busy), and OpenVINO runs two threads on one core, 10 % slower than one; a pod
    limited to 2 CPUs on a 64-core node would run 64 threads into its quota.
    """
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 CPU controller here: the mask alone
        pass
    return max(1, count)


def load_runner(choice: BackendChoice, threads: int | None = None, streams: int = 1):
    """The backend's runner with ``threads`` intra-op threads (default :func:`usable_cpus`) shared by ``streams``
    forward passes that may run at once (CUDA: always one)."""
    threads = threads or usable_cpus()
    streams = max(1, min(streams, threads))  # two forward passes on one core only take turns, in each other's cache
    if choice.backend == "torch":
        from dfmod.torch_model import TorchRunner

        return TorchRunner(choice.path, choice.device, threads, streams)
    if choice.backend == "onnxruntime":
        return OnnxRuntimeRunner(choice.path, choice.precision, threads, streams)
    return OpenVinoRunner(choice.path, choice.precision, threads, streams)


class Predictor:
    """A loaded model that turns batches of uint8 pixels into fake probabilities, on any backend.

    Create it inside the process that will use it (a worker child, never before a fork): creating it
    initialises CUDA when a GPU is used.
    """

    def __init__(
        self,
        checkpoint: Path | None = None,
        device: str = "auto",
        threshold: float | None = None,
        torch_threads: int | None = None,
        backend: str = "auto",
        precision: str = "auto",
        operating_point: str | None = None,
        streams: int = 1,
        trial_seconds: float = 0.0,
        trial_batch: int = 32,
    ) -> None:
        self.checkpoint_path = resolve_checkpoint_path(checkpoint)
        self.meta = read_meta(self.checkpoint_path)
        viable = _serving_candidates(self.checkpoint_path, backend, precision, device)
        self.choice = viable[0]
        # img/s of each combination auto timed here (empty without a trial): the static ranking is a guess
        # about the CPU, the trial measures it (see TRIAL_CANDIDATES).
        self.trial: dict[str, float] = {}
        candidates = viable[:TRIAL_CANDIDATES] if trial_seconds > 0 and self.choice.reason.startswith(AUTO_REASON) else []
        if len(candidates) > 1:
            self.choice, self.runner, self.trial = _trial(
                candidates, torch_threads, streams, self.meta, trial_batch, trial_seconds
            )
        else:
            self.runner = load_runner(self.choice, torch_threads, streams)
        # Forward passes that may run at once (the worker lets this many batches into the model together).
        self.streams = self.runner.streams
        self.device = self.choice.device
        # On CUDA the precision is the autocast type the GPU supports (torch-bf16 or torch-fp16).
        self.backend = f"{self.choice.backend}-{self.runner.precision}"
        self.threshold = decision_threshold(self.meta, operating_point, threshold)
        logger.info(
            "loaded %s (%s, threshold %.4f) on %s with backend %s from %s: %s", self.checkpoint_path.name,
            self.meta.model_version, self.threshold, self.device, self.backend, self.choice.path.name,
            self.choice.reason,
        )

    @property
    def model_version(self) -> str:
        return self.meta.model_version

    def logits(self, pixels: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """(N, 2) float32 logits for uint8 HWC images of the model's size (see :func:`load_pixels`)."""
        batch = stack_pixels(pixels)
        if not len(batch):
            return np.zeros((0, self.meta.num_classes), dtype=np.float32)
        return np.asarray(self.runner.logits(batch), dtype=np.float32)

    def predict_pixels(self, pixels: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """Calibrated fake probabilities (float64) for uint8 HWC images of the model's size."""
        if not len(pixels):
            return np.zeros((0,), dtype=np.float64)
        return fake_probabilities(self.logits(pixels), self.meta.temperature)

    def predict_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.predict_pixels([to_pixels(image, self.meta) for image in images])

    def warmup(self, batch_size: int = 1) -> float:
        """Run one dummy batch (autotuning, lazy allocations); returns its seconds."""
        height, width = self.meta.input_size[1:]
        dummy = np.zeros((batch_size, height, width, 3), dtype=np.uint8)
        started = time.perf_counter()
        self.predict_pixels(dummy)
        return time.perf_counter() - started

    def label_for(self, fake_probability: float) -> str:
        return "fake" if fake_probability >= self.threshold else "real"
