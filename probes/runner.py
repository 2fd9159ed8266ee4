"""The parent side of probing: choose the device, check the inputs, serve what the cache holds, and run every
other candidate in its own worker process (`peftpick.probes.worker`), one at a time, retrying with cheaper
settings after an out-of-memory.

Workers are started ahead of need (SPARE_WORKERS_GPU / _CPU at a time): a worker spends seconds importing torch,
transformers and peft, and that start-up overlaps the probe before it. A worker touches the GPU only once it has
its job, after the previous worker has exited, so no two probes share the device and NVML's figure is one
probe's. Ctrl-C ends the running worker and raises ProbesInterrupted with every finished result (already in the
cache).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from peftpick.errors import PeftpickError
from peftpick.probes.cache import ProbeCache, ProbeWarning, cache_key
from peftpick.probes.data import CHARS_PER_TOKEN_READ, ProbeData, model_encoder, pack_blocks
from peftpick.probes.job import PROTOCOL_VERSION, WORKLOAD_ENV, ProbeJob, ProbeProgram, probe_program
from peftpick.probes.results import STACK_NOTE_PREFIX, fit_loss_slope
from peftpick.probes.stack import STACK_FIELDS, libraries, settled
from peftpick.types import GIB, Architecture, Candidate, ProbeResult, TrainingPlan, TrainingShape

# Workers started ahead of need: two on a GPU machine; one for CPU probes, whose speed figures would suffer
# from more processes importing beside them.
SPARE_WORKERS_GPU = 2
SPARE_WORKERS_CPU = 1
# How a worker is started (after the Python executable); tests put a stand-in script here.
WORKER_COMMAND: tuple[str, ...] = ("-m", "peftpick.probes.worker")
DEFAULT_TIMEOUT_S = 1800.0  # per setting, from the moment the worker has its job; a guard against hangs
WORKER_START_TIMEOUT_S = 300.0  # importing torch, transformers and peft
CPU_MAX_PARAMETERS = 1_000_000_000  # beyond this a CPU probe takes hours per step
MAX_READ_CHARS = 50_000_000
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")

Progress = Callable[[str], None]


class ProbesInterrupted(KeyboardInterrupt):
    """Ctrl-C during probing. `results`: the probes that finished (they are in the cache too)."""

    def __init__(self, results: list[ProbeResult]):
        super().__init__(f"interrupted after {len(results)} finished probe(s)")
        self.results = results


# ------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class ProbeOptions:
    """How to probe; every value is checked here, once.

    batch_size / seq_len / gradient_checkpointing: the setting tried first when the caller gives no shapes.
    resolution / frames: diffusion denoisers' training images (pixels per side) and video frames per clip, in that
        setting; None: the model's usual (causal LMs take neither).
    steps: measured optimizer steps after `warmup_steps` (peaks cover both; speed only the measured ones).
    device: "cuda", "cuda:N" or "cpu"; None picks the GPU when there is one (CPU probes measure no memory).
    learning_rate: None uses each method's benchmark learning rate.
    data: a JSON lines / JSON / CSV / TSV / Parquet / text file; None uses the built-in sample.
    cache_path: None uses $PEFTPICK_CACHE_DIR/probes.sqlite or ~/.cache/peftpick/probes.sqlite.
    timeout_s: per setting tried; None: DEFAULT_TIMEOUT_S.
    gpus: ranks per probe (probes.torchrun: FSDP2 under torchrun, the busiest rank's peak); checked against the
        GPUs present once the device is known.
    optimizer / quant / loss / trainer: the stack of that setting (probes.stack; TrainingShape's values); optimizer
        None: each candidate's own (AdamW, or LoRA-FA's; LoRA-FA keeps its own whatever is asked). Settings the
        caller gives (plans) carry their own.
    """

    steps: int = 10
    warmup_steps: int = 1
    batch_size: int = 4
    seq_len: int = 768
    gradient_checkpointing: bool = False
    random_weights: bool = False
    device: str | None = None
    cache: bool = True
    cache_path: Path | None = None
    timeout_s: float | None = None
    data: str | Path | None = None
    text_field: str | None = None
    prompt_field: str | None = None
    response_field: str | None = None
    learning_rate: float | None = None
    seed: int = 0
    resolution: int | None = None
    frames: int | None = None
    gpus: int = 1  # >1: each probe runs under torchrun with FSDP2 on this many GPUs (CPU: gloo processes)
    optimizer: str | None = None  # None: the candidate's own
    quant: str = "none"
    loss: str = "stock"
    trainer: str = "plain"

    def __post_init__(self) -> None:
        from peftpick.probes.stack import check_names

        check_names(self.optimizer, self.quant, self.loss, self.trainer)
        _whole(self.steps, "steps", minimum=2, fix="probe at least 2 optimizer steps, e.g. --steps 10")
        _whole(self.warmup_steps, "warm-up steps", minimum=0, fix="use 0 or more warm-up steps")
        _whole(self.batch_size, "batch size", minimum=1, fix="pass e.g. --batch-size 4")
        _whole(self.seq_len, "sequence length", minimum=2, fix="pass e.g. --seq-len 768")
        _whole(self.seed, "seed", minimum=0, fix="use a non-negative seed")
        if self.resolution is not None:
            _whole(self.resolution, "resolution", minimum=8, fix="pass pixels per side, e.g. --resolution 512")
        if self.frames is not None:
            _whole(self.frames, "frame count", minimum=1, fix="pass frames per clip, e.g. --frames 33")
        if self.device is not None:
            kind, _, index = str(self.device).strip().lower().partition(":")
            if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
                raise PeftpickError(f"unknown device {self.device!r}", "use cuda, cuda:N or cpu")
            object.__setattr__(self, "device", f"{kind}:{index}" if index else kind)
        if self.timeout_s is not None and not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise PeftpickError(f"timeout must be a positive number of seconds, got {self.timeout_s!r}",
                                "pass e.g. timeout_s=600")
        if self.learning_rate is not None and not (
                isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)
                and self.learning_rate > 0):
            raise PeftpickError(f"learning rate must be a positive number, got {self.learning_rate!r}",
                                "pass e.g. learning_rate=1e-4, or leave it out for each method's own")
        for name in ("text_field", "prompt_field", "response_field"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise PeftpickError(f"{name.replace('_', ' ')} must be a field name, got {value!r}",
                                    "pass the name of a field in the data file")

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.steps

    @property
    def timeout(self) -> float:
        return float(self.timeout_s) if self.timeout_s is not None else DEFAULT_TIMEOUT_S


def _whole(value: Any, name: str, minimum: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PeftpickError(f"{name} must be a whole number of at least {minimum}, got {value!r}", fix)


def cheaper_settings(shape: TrainingShape) -> list[TrainingShape]:
    """`shape`, then what is tried after an out-of-memory, cheapest change first: gradient checkpointing, then
    halving the micro-batch with gradient accumulation keeping (at least) the effective batch."""
    effective = shape.effective_batch
    settings = [shape]
    if not shape.gradient_checkpointing:
        settings.append(dataclasses.replace(shape, gradient_checkpointing=True))
    micro = shape.batch_size
    while micro > 1:
        micro = (micro + 1) // 2
        settings.append(dataclasses.replace(shape, batch_size=micro, gradient_accumulation=-(-effective // micro),
                                            gradient_checkpointing=True))
    return settings


# ------------------------------------------------------------------------------------------- entry


ShapesArgument = TrainingShape | TrainingPlan | Sequence[TrainingShape | TrainingPlan] | \
    Mapping[str, TrainingShape | TrainingPlan] | None


def run_probes(model: Any, candidates: Sequence[Candidate], shapes: ShapesArgument = None,
               options: ProbeOptions | None = None, *, progress: Progress | bool | None = None) -> list[ProbeResult]:
    """Probe `candidates` (already built for the model) and return one result per candidate, in order.

    model: an Architecture, or anything `resolve_model` accepts (name, folder, hub id, PretrainedConfig).
    shapes: the setting to try first per candidate: one TrainingShape (or TrainingPlan: its estimate's shape) for
        all, a list aligned with `candidates`, or a mapping from method key; None: options' batch size, sequence
        length, checkpointing and stack. Each probe runs its setting's whole stack (optimizer, quantized base, loss
        kernel, trainer: probes.stack); a setting's plain "adamw" becomes LoRA-FA's own optimizer for LoRA-FA. On
        the CPU the dtype is float32, and a stack element the CPU cannot run is refused or replaced with a note
        (the result's `shape` is what ran, `requested_shape` what was asked).
    progress: a callable receiving one-line messages, True for a progress bar on stderr, False for silence,
        None for a bar when stderr is a terminal.
    Raises PeftpickError for bad input before anything runs, ProbesInterrupted on Ctrl-C.
    """
    options = options or ProbeOptions()
    if not candidates:
        raise PeftpickError("no candidate to probe", "pass at least one method")
    from peftpick.knowledge.architectures import resolve_model

    arch = model if isinstance(model, Architecture) else resolve_model(model)
    program = probe_program(arch.workload)  # what a probe of this kind of model does (see job.ProbeProgram)
    device, device_name = choose_device(options.device)
    from peftpick.probes.torchrun import check_gpus

    check_gpus(options.gpus, device)
    if options.gpus > 1 and arch.denoiser is not None:
        raise PeftpickError(f"multi-GPU probes are for language models, and {arch.name} is a denoiser",
                            "drop --gpus")
    program.check(arch, options, device)
    weights, local_only = program.weights_source(arch, options.random_weights)
    first_settings = _first_settings(candidates, shapes, options, arch, device, program)
    reporter = make_reporter(progress)
    try:
        data = program.load_data(options, first_settings)
        run = _ProbeRun(arch, list(candidates), first_settings, options, device, device_name, weights, local_only,
                        data, reporter, program)
        return run.execute()
    finally:
        reporter.close()


def choose_device(requested: str | None) -> tuple[str, str]:
    """("cuda:N" or "cpu", the GPU's name or "cpu")."""
    from peftpick.probes.device import detect_gpu, device_index

    if requested == "cpu":
        return "cpu", "cpu"
    index = device_index(requested) if requested else 0
    gpu = detect_gpu(index)
    if gpu is not None and not _torch_has_cuda():
        if requested is None:
            return "cpu", "cpu"
        raise PeftpickError(f"the installed torch has no CUDA support, so it cannot use {gpu.name}",
                            "install a CUDA build of torch (https://pytorch.org), or probe with device='cpu'")
    if gpu is None:
        if requested is None:
            return "cpu", "cpu"
        raise PeftpickError(f"no NVIDIA GPU found at {requested}",
                            "run on a machine with a CUDA GPU, or probe on the CPU (--device cpu: loss and speed, "
                            "no memory figures)")
    return f"cuda:{index}", gpu.name


def _torch_has_cuda() -> bool:
    import torch

    return torch.version.cuda is not None


def _check_cpu_size(arch: Architecture) -> None:
    from peftpick.knowledge.architectures import count_parameters

    parameters = count_parameters(arch)
    if parameters > CPU_MAX_PARAMETERS:
        raise PeftpickError(
            f"{arch.name} has {parameters / 1e9:.1f} B parameters: a probe on the CPU would take hours",
            "probe on a machine with a CUDA GPU, or probe a smaller model on the CPU")


def weights_source(arch: Architecture, random_weights: bool) -> tuple[str | None, bool]:
    """Where the worker loads weights from (None: random weights) and whether only local files may be used."""
    return probe_program(arch.workload).weights_source(arch, random_weights)


def lm_weights_source(arch: Architecture, random_weights: bool) -> tuple[str | None, bool]:
    """`weights_source` of a causal LM: a folder with weights, a hub id in the cache or reachable."""
    if random_weights:
        return None, True
    fix = "pass --random-weights (random_weights=True) to measure memory and speed without them"
    if arch.local_path:
        folder = Path(arch.local_path)
        if any(folder.glob("*.safetensors")) or any((folder / name).is_file() for name in _WEIGHT_FILES):
            return str(folder), True
        raise PeftpickError(f"folder {folder} has a config.json but no weights (*.safetensors or pytorch_model.bin)",
                            f"pass the folder that holds the weights, or {fix}")
    if arch.hub_id:
        if _hub_weights_cached(arch.hub_id):
            return arch.hub_id, True
        from peftpick.knowledge.architectures import _hub_reachable

        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
        if not offline and _hub_reachable():
            return arch.hub_id, False
        raise PeftpickError(f"the weights of {arch.hub_id} are not on this machine and the Hugging Face hub is "
                            "not reachable", f"download them (`hf download {arch.hub_id}`) and pass the folder, or {fix}")
    raise PeftpickError(f"{arch.name} comes from a config object, which has no weights", fix)


def _hub_weights_cached(hub_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return any(isinstance(try_to_load_from_cache(hub_id, name), str) for name in _WEIGHT_FILES)


def _first_settings(candidates: Sequence[Candidate], shapes: ShapesArgument, options: ProbeOptions,
                    arch: Architecture, device: str, program: ProbeProgram) -> list[TrainingShape]:
    def as_shape(value: Any) -> TrainingShape:
        if isinstance(value, TrainingPlan):
            return value.estimate.shape
        if isinstance(value, TrainingShape):
            return value
        raise PeftpickError(f"cannot use {type(value).__name__} as a training setting",
                            "pass TrainingShape or TrainingPlan objects")

    if shapes is None:
        chosen = [TrainingShape(batch_size=options.batch_size, seq_len=options.seq_len,
                                gradient_checkpointing=options.gradient_checkpointing, dtype=arch.dtype,
                                resolution=options.resolution, frames=options.frames,
                                optimizer=_optimizer_for(candidate, options.optimizer), quant=options.quant,
                                loss=options.loss, trainer=options.trainer) for candidate in candidates]
    elif isinstance(shapes, (TrainingShape, TrainingPlan)):
        chosen = [as_shape(shapes)] * len(candidates)
    elif isinstance(shapes, Mapping):
        missing = [c.method for c in candidates if c.method not in shapes]
        if missing:
            raise PeftpickError(f"no training setting given for {', '.join(missing)}", "give one per candidate")
        chosen = [as_shape(shapes[c.method]) for c in candidates]
    else:
        chosen = [as_shape(value) for value in shapes]
        if len(chosen) != len(candidates):
            raise PeftpickError(f"{len(chosen)} training settings for {len(candidates)} candidates",
                                "give one setting per candidate")
    settings = []
    for candidate, shape in zip(candidates, chosen):
        _whole(shape.batch_size, "batch size", 1, "use a micro-batch of at least 1")
        _whole(shape.seq_len, "sequence length", 2, "use at least 2 tokens")
        _whole(shape.gradient_accumulation, "gradient accumulation", 1, "use at least 1")
        if candidate.optimizer == "lora-fa" and candidate.peft_type != "LORA":
            raise PeftpickError(f"{candidate.display_name} asks for the LoRA-FA optimizer without a LoRA adapter",
                                "use the adamw optimizer for it")
        # CPU probes train in float32: bfloat16 matmuls are slow on most CPUs and memory is not measured there
        dtype = "float32" if device == "cpu" else str(shape.dtype).removeprefix("torch.")
        if dtype not in ("bfloat16", "float16", "float32"):
            raise PeftpickError(f"unsupported dtype {dtype!r}", "use bfloat16, float16 or float32")
        # the setting's own stack (a plan's: what its estimate assumed), checked and completed as the estimator does
        settings.append(program.first_shape(arch, settled(dataclasses.replace(shape, dtype=dtype),
                                                          candidate.optimizer)))
    return settings


def _optimizer_for(candidate: Candidate, asked: str | None) -> str:
    """The optimizer of a candidate's default setting: the one asked for, except that LoRA-FA keeps its own (its
    optimizer is the method), as the recommender plans it; None: the candidate's own."""
    return candidate.optimizer if asked is None or candidate.optimizer == "lora-fa" else asked


def _blocks_needed(settings: Sequence[TrainingShape], options: ProbeOptions) -> int:
    effective = max(rung.effective_batch for shape in settings for rung in cheaper_settings(shape))
    return effective * options.total_steps


def _chars_to_read(settings: Sequence[TrainingShape], options: ProbeOptions) -> int:
    tokens = _blocks_needed(settings, options) * max(shape.seq_len for shape in settings)
    return min(MAX_READ_CHARS, tokens * CHARS_PER_TOKEN_READ)


# ------------------------------------------------------------------------------------------- one run


class _ProbeRun:
    def __init__(self, arch: Architecture, candidates: list[Candidate], settings: list[TrainingShape],
                 options: ProbeOptions, device: str, device_name: str, weights: str | None, local_only: bool,
                 data: ProbeData, reporter: Reporter, program: ProbeProgram | None = None):
        self.arch = arch
        self.program = program or probe_program(arch.workload)
        self.candidates = candidates
        self.settings = settings
        self.options = options
        self.device = device
        self.device_name = device_name
        self.weights = weights
        self.local_only = local_only
        self.data = data
        self.reporter = reporter
        self.folder: Path | None = None
        self.pool: _WorkerPool | None = None
        self.tokens: tuple[str, tuple[str, ...]] | None = None

    def execute(self) -> list[ProbeResult]:
        results: dict[int, ProbeResult] = {}
        cache = ProbeCache.open(self.options.cache_path, self.reporter.warn) if self.options.cache else None
        self.reporter.begin([c.display_name for c in self.candidates], self.options.total_steps)
        try:
            keys = []
            for index, (candidate, shape) in enumerate(zip(self.candidates, self.settings)):
                parts = self._key_parts(candidate, shape)
                keys.append((cache_key(parts), parts))
                refusal = self.program.refusal(self.arch, candidate, shape, self.device, self.options.gpus)
                if refusal is not None:  # the stack cannot run here: say so, never measure another in its place
                    results[index] = self._refused(candidate, shape, refusal)
                    self.reporter.done(index, results[index])
                    continue
                cached = cache.get(keys[-1][0]) if cache is not None else None
                if cached is not None:
                    results[index] = cached
                    self.reporter.done(index, cached)
            to_run = [index for index in range(len(self.candidates)) if index not in results]
            if to_run:
                # Workers start importing now, while the data is tokenized.
                self.folder = Path(tempfile.mkdtemp(prefix="peftpick-probe-"))
                self.pool = _WorkerPool(self.folder, {WORKLOAD_ENV: self.arch.workload.value})
                self.pool.prestart(min(self._spares, len(to_run)))
            for position, index in enumerate(to_run):
                candidate, shape = self.candidates[index], self.settings[index]
                result = self._probe(index, candidate, shape, following=len(to_run) - position - 1)
                if cache is not None and result.status in ("ok", "oom"):
                    key, parts = keys[index]
                    cache.put(key, result, parts)
                results[index] = result
                self.reporter.done(index, result)
        except KeyboardInterrupt:
            if self.pool is not None:
                self.pool.close(kill=True)
            raise ProbesInterrupted([results[index] for index in sorted(results)]) from None
        finally:
            if self.pool is not None:
                self.pool.close()
            if cache is not None:
                cache.close()
            if self.folder is not None:
                shutil.rmtree(self.folder, ignore_errors=True)
        return [results[index] for index in range(len(self.candidates))]

    @property
    def _spares(self) -> int:
        if self.options.gpus > 1:  # torchrun starts its own ranks
            return 0
        return SPARE_WORKERS_CPU if self.device == "cpu" else SPARE_WORKERS_GPU

    # -- keys

    def _key_parts(self, candidate: Candidate, shape: TrainingShape) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL_VERSION,
            "model": {"source": self._model_source(), "config_sha256": cache_key(self.arch.config),
                      "weights": "pretrained" if self.weights else "random"},
            "method": {"key": candidate.method, "config_class": candidate.peft_config_class,
                       "kwargs": candidate.peft_kwargs, "optimizer": candidate.optimizer},
            "learning_rate": self._learning_rate(candidate),
            "shape": dataclasses.asdict(shape),
            "steps": self.options.steps, "warmup_steps": self.options.warmup_steps, "seed": self.options.seed,
            "data": self.data.identity,
            "device": self.device_name,
            "versions": _library_versions(tuple(dict.fromkeys(self.program.library_names + libraries(shape)))),
            **({"gpus": self.options.gpus} if self.options.gpus > 1 else {}),
        }

    def _model_source(self) -> str:
        if self.arch.local_path:
            return str(Path(self.arch.local_path).resolve())
        return self.arch.hub_id or self.arch.name

    def _learning_rate(self, candidate: Candidate) -> float:
        return float(self.options.learning_rate or candidate.learning_rate)

    # -- running

    def _probe(self, index: int, candidate: Candidate, requested: TrainingShape, following: int) -> ProbeResult:
        runnable, stack_notes = self.program.runnable(requested, self.device)
        tokens_path, notes = self._tokens()
        notes = tuple(notes) + tuple(stack_notes)
        out_of_memory: list[TrainingShape] = []
        wall = 0.0
        phases: dict[str, float] = {}
        result: ProbeResult | None = None
        for setting in cheaper_settings(runnable):
            self.reporter.attempt(index, _setting_words(setting), retry=bool(out_of_memory))
            job = ProbeJob(candidate=candidate, architecture=self.arch, shape=setting, weights=self.weights,
                           device=self.device, steps=self.options.steps, warmup_steps=self.options.warmup_steps,
                           learning_rate=self._learning_rate(candidate), tokens_path=str(tokens_path),
                           seed=self.options.seed, local_files_only=self.local_only, world_size=self.options.gpus)
            outcome = self._run_job(index, job, following)
            wall += outcome.wall
            for phase, seconds in outcome.phases.items():
                phases[phase] = phases.get(phase, 0.0) + seconds
            result = self._result(candidate, requested, setting, outcome, tuple(out_of_memory), wall, phases, notes)
            if result.status != "oom":
                return result
            out_of_memory.append(setting)
            self.reporter.warn_quiet(f"{candidate.display_name}: out of memory with {_setting_words(setting)}")
        assert result is not None
        return dataclasses.replace(result, oom_settings=tuple(out_of_memory))  # none fits: every one tried

    def _refused(self, candidate: Candidate, requested: TrainingShape, reason: str) -> ProbeResult:
        self.reporter.warn_quiet(f"{candidate.display_name}: not probed: {reason}")
        return ProbeResult(method=candidate.method, status="error", shape=requested, device=self.device_name,
                           display_name=candidate.display_name, requested_shape=requested,
                           error=f"not run: {reason}", learning_rate=self._learning_rate(candidate),
                           notes=(_stack_note(requested, None, refused=True),), **_stack_field(requested, None))

    def _tokens(self) -> tuple[str, tuple[str, ...]]:
        """The program's inputs (a causal LM's packed token blocks), made once per run, on the first probe that is
        not cached."""
        if self.tokens is None:
            assert self.folder is not None
            self.tokens = self.program.prepare_inputs(self)
        return self.tokens

    def _run_job(self, index: int, job: ProbeJob, following: int) -> _Outcome:
        """Run one job in a fresh worker; `following`: candidates still to probe after this one."""
        assert self.folder is not None and self.pool is not None
        if job.world_size > 1:
            from peftpick.probes.torchrun import run_distributed

            message, wall = run_distributed(job, self.folder, self.options.timeout)
            return _Outcome(message, wall, {})
        worker = self.pool.take(ahead=min(self._spares, following))
        job_path = self.folder / f"job-{worker.number}.pkl"
        with job_path.open("wb") as handle:
            pickle.dump(job, handle)
        return _follow(worker, job_path, job, self.options.timeout,
                       on_step=lambda step, of, peak: self.reporter.step(index, step, of, peak))

    def _result(self, candidate: Candidate, requested: TrainingShape, setting: TrainingShape, outcome: _Outcome,
                out_of_memory: tuple[TrainingShape, ...], wall: float, phases: dict[str, float],
                notes: tuple[str, ...]) -> ProbeResult:
        message = outcome.message
        status = message.get("status", "error")
        stack = message.get("stack") if isinstance(message.get("stack"), dict) else None
        if stack is not None:  # what the worker ran, which the result's setting states
            ran = {name: str(stack[name]) for name in STACK_FIELDS if stack.get(name)}
            setting = dataclasses.replace(setting, **ran)
        losses = tuple(math.nan if value is None else float(value) for value in message.get("losses", ()))
        slope, stderr = fit_loss_slope(losses) if status == "ok" else (None, None)
        measured_memory = status == "ok" and self.device != "cpu"
        versions = dict(message.get("versions") or {})
        extra_notes = list(notes)
        if status == "ok" and any(math.isnan(value) for value in losses):
            extra_notes.append("the loss became NaN or infinite: no slope fitted (learning rate too high?)")
        extra_notes.append(_stack_note(setting, stack))
        extra_notes.extend(str(note) for note in (stack or {}).get("notes") or () if str(note) not in extra_notes)
        return ProbeResult(
            method=candidate.method,
            status=status,
            shape=setting,
            device=versions.get("gpu") or self.device_name,
            peak_allocated_bytes=message.get("peak_allocated") if measured_memory else None,
            peak_reserved_bytes=message.get("peak_reserved") if measured_memory else None,
            nvml_used_bytes=message.get("nvml_used") if measured_memory else None,
            tokens_per_second=message.get("tokens_per_second"),
            step_seconds=message.get("step_seconds"),
            losses=losses,
            loss_slope=slope,
            loss_slope_stderr=stderr,
            wall_seconds=wall,
            trainable_params=message.get("trainable"),
            error=message.get("error"),
            versions=versions,
            display_name=candidate.display_name,
            requested_shape=requested,
            oom_settings=out_of_memory,
            total_params=message.get("total"),
            breakdown=dict(message.get("breakdown") or {}) if measured_memory else {},
            learning_rate=self._learning_rate(candidate),
            data=self.data.description,
            phase_seconds={name: round(seconds, 4) for name, seconds in phases.items()},
            notes=tuple(extra_notes) + tuple(message.get("notes") or ()),
            gpus=self.options.gpus,
            ranks=tuple(_rank_summary(rank) for rank in message.get("ranks") or ()),
            **_stack_field(setting, stack),
        )


def _stack_note(shape: TrainingShape, stack: dict[str, Any] | None, refused: bool = False) -> str:
    """The one line that states a probe's stack, e.g. "stack: optimizer adamw-8bit (bitsandbytes.optim.adamw.
    AdamW8bit), base 4bit (...), loss stock, trainer hf (transformers.Trainer)"."""
    from peftpick.probes.stack import QUANT_WORDS

    stack = stack or {}
    details = stack.get("details") or {}
    optimizer = shape.optimizer + (f" ({stack['optimizer_class']})" if stack.get("optimizer_class") else "")
    base = shape.quant + (f" ({details['quant']})" if details.get("quant") else
                          (f" ({QUANT_WORDS[shape.quant]})" if shape.quant != "none" else ""))
    run = stack.get("trainer_run")
    trainer = shape.trainer + (f" ({run})" if run and run != shape.trainer else "")
    state = details.get("optimizer_state_bytes")
    state_words = ""
    if state:
        by_dtype = json.loads(state)
        state_words = "; optimizer state " + ", ".join(f"{n:,} bytes {dtype}"
                                                      for dtype, n in sorted(by_dtype.items()))
    return (f"{STACK_NOTE_PREFIX}optimizer {optimizer}, base {base}, loss {shape.loss}, trainer {trainer}"
            + (" (not run)" if refused else "" if stack else " (as asked; the worker did not report its stack)")
            + state_words)


def _stack_field(shape: TrainingShape, stack: dict[str, Any] | None) -> dict[str, Any]:
    """ProbeResult's `stack`: what ran, by name."""
    record = {name: str(getattr(shape, name)) for name in STACK_FIELDS}
    for key in ("optimizer_class", "trainer_run"):
        if (stack or {}).get(key):
            record[key] = str(stack[key])
    for key, value in ((stack or {}).get("details") or {}).items():
        record[key] = str(value)
    return {"stack": record}


def _rank_summary(record: dict[str, Any]) -> dict[str, Any]:
    """What a rank's record says for people and the cache: status, error, peaks, step time."""
    keys = ("rank", "status", "error", "peak_allocated", "peak_reserved", "nvml_used", "step_seconds", "trainable",
            "total", "breakdown")
    return {key: record[key] for key in keys if key in record}


def pack_tokens(run: _ProbeRun) -> tuple[str, tuple[str, ...]]:
    """A causal LM's inputs: the run's data tokenized and packed into blocks (`ProbeProgram.prepare_inputs`)."""
    assert run.folder is not None
    run.reporter.message("tokenizing the probe data")
    encoder = model_encoder(run.arch, run.weights, run.local_only)
    seq_len = max(shape.seq_len for shape in run.settings)
    blocks, notes = pack_blocks(run.data, encoder, seq_len, _blocks_needed(run.settings, run.options))
    import torch

    path = run.folder / "tokens.pt"
    torch.save(blocks, path)
    return str(path), (f"tokens: {encoder.name}", *notes)


def _library_versions(names: Sequence[str] = ("torch", "transformers", "peft", "peftpick")) -> dict[str, str]:
    """Versions that go into cache keys, read without importing the libraries."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _setting_words(shape: TrainingShape) -> str:
    words = f"micro-batch {shape.batch_size}"
    if shape.gradient_accumulation > 1:
        words += f" x {shape.gradient_accumulation} accumulation"
    return words + (", checkpointing" if shape.gradient_checkpointing else "")


# ------------------------------------------------------------------------------------------- workers


class _Worker:
    """One worker process: its job goes in on stdin, events come back on a pipe, output goes to a log file."""

    def __init__(self, folder: Path, number: int, env: Mapping[str, str] | None = None):
        self.number = number
        self.log_path = folder / f"worker-{number}.log"
        read_end, write_end = os.pipe()
        self.spawned = time.time()
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, *WORKER_COMMAND, "--events-fd", str(write_end)],
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, pass_fds=(write_end,),
                start_new_session=True,  # the terminal's Ctrl-C goes to the parent only, which ends workers
                env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})},
            )
        os.close(write_end)
        self._events = read_end
        self._buffer = b""
        self.ready_at: float | None = None
        self.import_seconds: float | None = None

    def send(self, job_path: Path) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{job_path}\n".encode())
        self.process.stdin.close()

    def next_event(self, deadline: float) -> dict[str, Any] | None | EOFError:
        """The next event; None when `deadline` (time.monotonic) passes first; EOFError when the pipe closed."""
        while b"\n" not in self._buffer:
            wait = deadline - time.monotonic()
            if wait <= 0:
                return None
            readable, _, _ = select.select([self._events], [], [], min(wait, 1.0))
            if not readable:
                continue
            chunk = os.read(self._events, 65536)
            if not chunk:
                return EOFError()
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            return {"event": "garbled", "text": line[:200].decode(errors="replace")}

    def log_tail(self, lines: int = 6) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text[-lines:] if line.strip())[-800:]

    def stop(self, kill: bool = False, wait_s: float = 10.0) -> int | None:
        """End the process (closing stdin lets an idle one exit by itself); its exit code."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            try:
                self.process.stdin.close()
            except OSError:
                pass
        if kill and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        try:
            os.close(self._events)
        except OSError:
            pass
        return self.process.returncode


class _WorkerPool:
    def __init__(self, folder: Path, env: Mapping[str, str] | None = None):
        self.folder = folder
        self.env = dict(env or {})  # what every worker gets beside this process's environment
        self.spares: list[_Worker] = []
        self.started = 0

    def _start(self) -> _Worker:
        self.started += 1
        return _Worker(self.folder, self.started, self.env)

    def prestart(self, count: int) -> None:
        while len(self.spares) < count:
            self.spares.append(self._start())

    def take(self, ahead: int) -> _Worker:
        """A started worker for the next job (the oldest spare), with `ahead` more starting for the jobs after it.
        A retry after an out-of-memory takes one of them too; the pool never holds more than `ahead` spares."""
        worker = self.spares.pop(0) if self.spares else self._start()
        self.prestart(ahead)
        return worker

    def close(self, kill: bool = False) -> None:
        spares, self.spares = self.spares, []
        for worker in spares:
            worker.stop(kill=True, wait_s=5.0)  # an idle worker may still be importing: do not wait for it


@dataclass
class _Outcome:
    message: dict[str, Any]
    wall: float  # from handing over the job to the worker's exit
    phases: dict[str, float]


def _follow(worker: _Worker, job_path: Path, job: ProbeJob, timeout: float,
            on_step: Callable[[int, int, int | None], None]) -> _Outcome:
    """Hand `job` to `worker` and follow its events until its result, its death or the timeout."""
    sent = time.time()
    worker.send(job_path)
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    phases: dict[str, float] = {}
    last_step = 0
    try:
        while True:
            event = worker.next_event(deadline)
            if event is None:
                where = f"at step {last_step + 1} of {job.total_steps}" if "started" in phases else "while starting"
                limit = timeout if "started" in phases else WORKER_START_TIMEOUT_S
                worker.stop(kill=True, wait_s=5.0)
                return _Outcome({"status": "error", "error": f"timed out after {limit:g} s {where}; the worker "
                                 "was stopped"}, time.time() - sent, phases)
            if isinstance(event, EOFError):
                code = worker.stop(wait_s=10.0)
                return _Outcome({"status": "error", "error": f"the worker process ended without a result "
                                 f"({_exit_words(code)}); last output: {worker.log_tail() or 'none'}"},
                                time.time() - sent, phases)
            kind = event.get("event")
            if kind == "ready":
                worker.ready_at = float(event["at"])
                phases["worker_import"] = float(event["import_seconds"])
                phases["waiting_for_worker"] = max(0.0, worker.ready_at - sent)
            elif kind == "started":
                phases["started"] = 0.0
                deadline = time.monotonic() + timeout
            elif kind == "step":
                last_step = int(event["step"])
                on_step(last_step, int(event["of"]), event.get("peak_allocated"))
            elif kind == "result":
                finished = time.time()
                worker.stop(wait_s=30.0)
                phases.pop("started", None)
                phases.update({name: float(seconds) for name, seconds in (event.get("phases") or {}).items()})
                phases["worker_exit"] = time.time() - finished
                return _Outcome(event, time.time() - sent, phases)
    except BaseException:
        worker.stop(kill=True, wait_s=5.0)
        raise


def _exit_words(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (the system may have run out of host memory)" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit code {code}"


# ------------------------------------------------------------------------------------------- progress


class Reporter:
    """Silent progress; warnings go through Python's warnings module."""

    def begin(self, labels: list[str], steps: int) -> None: ...
    def attempt(self, index: int, setting: str, retry: bool) -> None: ...
    def step(self, index: int, step: int, of: int, peak: int | None) -> None: ...
    def done(self, index: int, result: ProbeResult) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...

    def warn(self, text: str) -> None:
        import warnings

        warnings.warn(text, ProbeWarning, stacklevel=2)

    def warn_quiet(self, text: str) -> None:
        """Something worth a line on a progress display but not a warning (an expected out-of-memory)."""


class MessageReporter(Reporter):
    """One-line messages to a callback (e.g. the recommender's spinner)."""

    def __init__(self, say: Progress):
        self.say = say
        self.labels: list[str] = []

    def begin(self, labels: list[str], steps: int) -> None:
        self.labels = labels

    def _label(self, index: int) -> str:
        return f"{self.labels[index]} ({index + 1}/{len(self.labels)})"

    def attempt(self, index: int, setting: str, retry: bool) -> None:
        self.say(f"probing {self._label(index)}: {'retrying with ' if retry else ''}{setting}")

    def step(self, index: int, step: int, of: int, peak: int | None) -> None:
        self.say(f"probing {self._label(index)}: step {step}/{of}" + (f", peak {peak / GIB:.2f} GiB" if peak else ""))

    def done(self, index: int, result: ProbeResult) -> None:
        self.say(f"probed {self._label(index)}: {outcome_words(result)}")

    def message(self, text: str) -> None:
        self.say(text)

    def warn(self, text: str) -> None:
        self.say(f"warning: {text}")

    def warn_quiet(self, text: str) -> None:
        self.say(text)


class RichReporter(Reporter):
    """A live table of bars on stderr: candidate, step, live peak."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn("{task.description:<16}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[status]}"), console=self.console,
                                 transient=False)
        self.tasks: list[Any] = []
        self.settings: dict[int, str] = {}

    def begin(self, labels: list[str], steps: int) -> None:
        self.progress.start()
        self.tasks = [self.progress.add_task(label, total=steps, status="waiting") for label in labels]

    def attempt(self, index: int, setting: str, retry: bool) -> None:
        self.settings[index] = setting
        status = f"out of memory, retrying: {setting}" if retry else setting
        self.progress.reset(self.tasks[index], start=True, completed=0, status=status)

    def step(self, index: int, step: int, of: int, peak: int | None) -> None:
        status = self.settings.get(index, "")
        if peak:
            status += f" | peak {peak / GIB:.2f} GiB"
        self.progress.update(self.tasks[index], completed=step, total=of, status=status)

    def done(self, index: int, result: ProbeResult) -> None:
        task = self.progress.tasks[index]
        self.progress.update(self.tasks[index], completed=task.total if result.status == "ok" else task.completed,
                             status=outcome_words(result))

    def message(self, text: str) -> None:
        self.progress.console.print(f"[dim]{text}[/dim]", highlight=False)

    def warn(self, text: str) -> None:
        self.progress.console.print(f"warning: {text}", markup=False, highlight=False)

    def close(self) -> None:
        self.progress.stop()


def make_reporter(progress: Progress | bool | None) -> Reporter:
    if callable(progress):
        return MessageReporter(progress)
    if progress is None:
        progress = sys.stderr.isatty()
    return RichReporter() if progress else Reporter()


def outcome_words(result: ProbeResult) -> str:
    """A few words on how a probe ended, e.g. "ok, peak 12.31 GiB (cached)"."""
    if result.status == "ok":
        words = "ok"
        if result.peak_reserved_bytes is not None:
            words += f", peak {result.peak_reserved_bytes / GIB:.2f} GiB reserved"
        if result.oom_settings:
            words += f" with {_setting_words(result.shape)}"
    elif result.status == "oom":
        words = "out of memory in every setting tried"
    else:
        words = f"failed: {result.error or 'unknown error'}"
    return words + (" (cached)" if result.from_cache else "")
