"""The worker process of a probe: `python -m peftpick.probes.worker --events-fd N`.

It imports torch, transformers and peft first and says "ready" (the parent starts workers ahead of need, so this
start-up overlaps the previous probe), then reads one job path from stdin, runs that one micro-training and
exits. One process per candidate and setting keeps a crash or an out-of-memory from touching another
measurement: each probe starts with a fresh CUDA context and allocator.

Events go to the parent as JSON lines on file descriptor N (stdout and stderr are left to the libraries and end
up in a log file): ready, started, loaded, step (with the loss and the live peak), result.

The loop is the one the memory estimator models (estimator/training.py), with gradient accumulation around it:

    for each micro-batch: out, loss = program.forward(model, batch); (loss / accumulation).backward()
    clip_grad_norm_(trainable, 1.0); optimizer.step(); optimizer.zero_grad(set_to_none=True)

What the model is, what a batch is and what its loss is belong to the job's workload (`job.probe_program`): the
causal LM's program is here (`out = model(input_ids=x, labels=x)`, loss `out.loss`), a diffusion denoiser's in
`peftpick.probes.diffusion`. `out` and the batch are kept until the next forward rebinds them, as in that loop.
Peak statistics are reset once the model, adapter and optimizer are built, so the peaks cover every training step (the warm-up step included, where the
optimizer state first appears) with the weights resident, but not transient loading buffers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import pickle
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from peftpick.probes.job import FAULTS_ENV, WORKLOAD_ENV, ProbeJob, ProbeProgram, probe_program
from peftpick.types import Workload

Send = Callable[..., None]
WEIGHT_DECAY = 0.1  # as in the benchmark runs and the estimator
MAX_GRAD_NORM = 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peftpick.probes.worker")
    parser.add_argument("--events-fd", type=int, required=True, help="file descriptor to write JSON events to")
    args = parser.parse_args(argv)
    # Ctrl-C belongs to the parent, which ends workers itself (they also run in their own session).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    events = os.fdopen(args.events_fd, "w", buffering=1, encoding="utf-8")

    def send(**message: Any) -> None:
        events.write(json.dumps(message) + "\n")

    started = time.time()
    # the heavy imports, done before the job arrives: those of the workload the parent is probing
    probe_program(os.environ.get(WORKLOAD_ENV) or Workload.CAUSAL_LM).preload()

    send(event="ready", at=time.time(), import_seconds=time.time() - started)
    line = sys.stdin.readline().strip()
    if not line:  # the parent did not need this worker
        return 0
    with open(line, "rb") as handle:
        job: ProbeJob = pickle.load(handle)
    send(event="started", at=time.time())
    result = run_job(job, send)
    send(event="result", **result)
    events.close()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown (a second or more with torch loaded): the parent waits for this exit
    # before the next probe touches the GPU, and the process's memory, the CUDA context included, goes with it.
    os._exit(0)


# ------------------------------------------------------------------------------------------- the probe


def run_job(job: ProbeJob, send: Send, wrap: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """Run `job` and return the result message (status ok / oom / error with what was measured). `wrap`: applied
    to the model once the adapter is on it, before the optimizer is built (probes.torchrun shards it there)."""
    import torch

    probe = _Probe(job, send, wrap)
    try:
        probe.run()
        probe.record["status"] = "ok"
    except Exception as error:  # every failure is a result; the parent decides what to do with it
        probe.record["status"] = "oom" if _is_out_of_memory(error) else "error"
        probe.record["error"] = f"{type(error).__name__}: {_first_line(error)}"
        if probe.record["status"] == "error":
            traceback.print_exc()
    finally:
        probe.record["phases"] = probe.phases
        if probe.cuda:
            probe.record["peak_allocated"] = torch.cuda.max_memory_allocated(probe.device)
            probe.record["peak_reserved"] = torch.cuda.max_memory_reserved(probe.device)
    return probe.record


class _Probe:
    def __init__(self, job: ProbeJob, send: Send, wrap: Callable[[Any], Any] | None = None):
        import torch

        self.job = job
        self.wrap = wrap
        self.send = send
        self.program: ProbeProgram = probe_program(job.workload)
        self.device = torch.device(job.device)
        self.cuda = self.device.type == "cuda"
        self.phases: dict[str, float] = {}
        self.record: dict[str, Any] = {"losses": [], "versions": _versions(None, self.program)}
        self._clock = time.perf_counter()

    def _lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._clock
        self._clock = now

    def run(self) -> None:
        import torch

        job = self.job
        nvml = None
        if self.cuda:
            from peftpick.probes.device import NvmlMemory, device_index

            nvml = NvmlMemory.open(device_index(job.device))  # baseline before this process touches the GPU
            torch.cuda.set_device(self.device)
            torch.empty(1, device=self.device)  # creates the CUDA context now, so "load" is only the model
            self.record["versions"] = _versions(torch.cuda.get_device_name(self.device), self.program)
        self._lap("cuda_init")

        model, trainable = self._model()
        if self.wrap is not None:
            model = self.wrap(model)
            trainable = [p for p in model.parameters() if p.requires_grad]  # the wrapper's (sharded) parameters
        optimizer = self._optimizer(model, trainable)
        next_batch = self.program.batches(job, self.device, getattr(torch, job.shape.dtype))
        self.record.update(_parameter_counts(model))
        self.send(event="loaded", trainable=self.record["trainable"], total=self.record["total"])
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._lap("load")

        fault = _fault_for(job)
        shape = job.shape
        out = None
        step_seconds: list[float] = []
        for step in range(1, job.total_steps + 1):
            if fault is not None and fault["step"] == step:
                _trigger(fault)
            began = time.perf_counter()
            micro_losses = []
            for _ in range(shape.gradient_accumulation):
                batch = next_batch(shape.batch_size)
                out, loss = self.program.forward(model, batch)
                (loss / shape.gradient_accumulation if shape.gradient_accumulation > 1 else loss).backward()
                micro_losses.append(loss.detach())
            torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_loss = float(torch.stack(micro_losses).float().mean())  # waits for the step to finish
            if self.cuda:
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - began
            step_seconds.append(seconds)
            self.record["losses"].append(step_loss if math.isfinite(step_loss) else None)
            peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else None
            if nvml is not None:
                nvml.sample()
            self.send(event="step", step=step, of=job.total_steps, loss=step_loss if math.isfinite(step_loss) else None,
                      peak_allocated=peak, seconds=seconds)
            self._lap("warmup" if step <= job.warmup_steps else "steps")
        del out

        measured = step_seconds[job.warmup_steps:]
        self.record["step_seconds"] = sum(measured) / len(measured)
        self.record["tokens_per_second"] = job.tokens_per_step * len(measured) / sum(measured)
        if self.cuda:
            self.record["breakdown"] = _breakdown(model, optimizer, trainable, self.device,
                                                  torch.cuda.max_memory_allocated(self.device),
                                                  job.candidate.peft_config_class is None)
        if nvml is not None:
            nvml.sample()
            self.record["nvml_used"] = nvml.used_above_baseline

    def _model(self):
        import torch

        job = self.job
        torch.manual_seed(job.seed)
        model = self.program.build_model(job, self.device, getattr(torch, job.shape.dtype))
        if job.shape.gradient_checkpointing:
            self.program.enable_gradient_checkpointing(model)
        config = job.candidate.peft_config()
        if config is None:
            model.requires_grad_(True)
        else:
            from peft import get_peft_model

            torch.manual_seed(job.seed)
            model = get_peft_model(model, config)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError(f"{job.candidate.display_name} left no trainable parameter in this model")
        return model, trainable

    def _optimizer(self, model, trainable):
        import torch

        job = self.job
        if job.candidate.optimizer == "lora-fa":
            from peft.optimizers import create_lorafa_optimizer

            config = model.peft_config["default"]
            return create_lorafa_optimizer(model, r=config.r, lora_alpha=config.lora_alpha, lr=job.learning_rate,
                                           weight_decay=WEIGHT_DECAY, use_rslora=config.use_rslora)
        return torch.optim.AdamW(trainable, lr=job.learning_rate, weight_decay=WEIGHT_DECAY)


# ------------------------------------------------------------------------------------------- the causal LM


class CausalLMProgram(ProbeProgram):
    """A causal LM's probe: packed token blocks of the user's data (or the built-in sample), labels = inputs."""

    workload = Workload.CAUSAL_LM

    @property
    def default_methods(self) -> tuple[str, ...]:  # type: ignore[override]
        from peftpick.probes import DEFAULT_METHODS

        return DEFAULT_METHODS

    # -- the parent's side (the runner's functions: this is what probes did before there were workloads)

    def first_shape(self, arch, shape):
        from peftpick.errors import PeftpickError

        if shape.resolution is not None or shape.frames is not None:
            raise PeftpickError(f"a resolution or frame count is for image and video models, and {arch.name} is a "
                                "causal language model", "leave resolution and frames out; set seq_len instead")
        return shape

    def check(self, arch, options, device):
        if device == "cpu":
            from peftpick.probes.runner import _check_cpu_size

            _check_cpu_size(arch)

    def weights_source(self, arch, random_weights):
        from peftpick.probes.runner import lm_weights_source

        return lm_weights_source(arch, random_weights)

    def load_data(self, options, settings):
        from peftpick.probes.data import load_probe_data
        from peftpick.probes.runner import _chars_to_read

        return load_probe_data(options.data, text_field=options.text_field, prompt_field=options.prompt_field,
                               response_field=options.response_field, max_chars=_chars_to_read(settings, options))

    def prepare_inputs(self, run):
        from peftpick.probes.runner import pack_tokens

        return pack_tokens(run)

    def tokens_per_step(self, job):
        return job.shape.batch_size * job.shape.gradient_accumulation * job.shape.seq_len

    # -- the worker's side

    def preload(self):
        import peft  # noqa: F401
        import torch  # noqa: F401
        from transformers import AutoModelForCausalLM  # noqa: F401

    def build_model(self, job, device, dtype):
        import torch
        from transformers import AutoModelForCausalLM

        if job.weights is None:
            from peftpick.knowledge.architectures import build_config

            with torch.device(device):
                return AutoModelForCausalLM.from_config(build_config(job.architecture), dtype=dtype)
        options: dict[str, Any] = {"dtype": dtype, "local_files_only": job.local_files_only}
        if device.type == "cuda":
            options["device_map"] = {"": device.index or 0}  # load straight onto the GPU
        return AutoModelForCausalLM.from_pretrained(job.weights, **options)

    def enable_gradient_checkpointing(self, model):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()

    def batches(self, job, device, dtype):
        import torch

        tokens = torch.load(job.tokens_path, weights_only=True)
        rows = tokens.shape[0]
        cursor = 0

        def next_batch(size: int):
            nonlocal cursor
            rows_now = [(cursor + offset) % rows for offset in range(size)]
            cursor += size
            return tokens[rows_now].to(device)

        return next_batch

    def forward(self, model, batch):
        out = model(input_ids=batch, labels=batch)
        return out, out.loss


def causal_lm_program() -> CausalLMProgram:
    """The `probe_program` hook of causal LMs (peftpick.workloads)."""
    return CausalLMProgram()


# ------------------------------------------------------------------------------------------- helpers


def _parameter_counts(model) -> dict[str, int]:
    total = trainable = 0
    for parameter in model.parameters():  # shared (tied) parameters are listed once
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return {"trainable": trainable, "total": total}


def _breakdown(model, optimizer, trainable, device, peak: int, full: bool) -> dict[str, int]:
    """Bytes at the peak by part: what stays resident is counted (weights, adapter, optimizer state); the rest of
    the peak (gradients, activations, logits, temporaries) is one part, measured as the difference."""
    seen: set[int] = set()

    def nbytes(tensors) -> int:
        total = 0
        for tensor in tensors:
            tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a rank's shard (FSDP2)
            if tensor.device != device or tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
        return total

    trainable_ids = {id(p) for p in trainable}
    adapter = 0 if full else nbytes(trainable)
    weights = nbytes([p for p in model.parameters() if full or id(p) not in trainable_ids]) + nbytes(model.buffers())
    state = nbytes([value for entry in optimizer.state.values() for value in entry.values()
                    if hasattr(value, "data_ptr")])
    parts = {"weights": weights, "adapter": adapter, "optimizer": state}
    rest = peak - sum(parts.values())
    if rest < 0:  # the peak came before the optimizer state existed: no honest split
        return {"measured peak": peak}
    parts["grads, activations and temporaries"] = rest
    return {name: value for name, value in parts.items() if value or name == "weights"}


def _versions(gpu: str | None, program: ProbeProgram | None = None) -> dict[str, str]:
    import platform

    import peft
    import torch
    import transformers

    from peftpick import __version__

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                "python": platform.python_version(), "peftpick": __version__}
    for name in (program.library_names if program is not None else ()):
        if name not in versions:
            versions[name] = getattr(importlib.import_module(name), "__version__", "unknown")
    if torch.version.cuda:
        versions["cuda"] = torch.version.cuda
    if gpu:
        versions["gpu"] = gpu
    return versions


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    # cuBLAS / cuDNN and the CPU allocator report memory exhaustion as plain RuntimeErrors
    return isinstance(error, RuntimeError) and any(
        marker in text for marker in ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "can't allocate memory"))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else "no message")[:500]


def _fault_for(job: ProbeJob) -> dict[str, Any] | None:
    """The test-only fault planned for this job (see job.FAULTS_ENV), or None."""
    raw = os.environ.get(FAULTS_ENV)
    if not raw:
        return None
    fault = json.loads(raw).get(job.candidate.method)
    if not fault:
        return None
    if job.shape.batch_size <= int(fault.get("above_micro_batch", 0)):
        return None
    if fault.get("unless_checkpointing") and job.shape.gradient_checkpointing:
        return None
    if "rank" in fault and int(fault["rank"]) != int(os.environ.get("RANK", 0)):
        return None
    return {"kind": fault["kind"], "step": int(fault.get("step", 1))}


def _trigger(fault: dict[str, Any]) -> None:
    import torch

    kind = fault["kind"]
    if kind == "oom":
        raise torch.OutOfMemoryError(f"simulated out of memory at step {fault['step']} ({FAULTS_ENV})")
    if kind == "error":
        raise RuntimeError(f"simulated failure at step {fault['step']} ({FAULTS_ENV})")
    if kind == "crash":
        os._exit(70)  # dies without a result, as a segfault or a killed process would
    if kind == "hang":
        time.sleep(3600)
    raise ValueError(f"unknown fault kind {kind!r} in {FAULTS_ENV}")


if __name__ == "__main__":
    sys.exit(main())
