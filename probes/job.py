"""What the parent hands a worker process: one candidate in one training setting. Plain data, no heavy imports,
so both sides can import it cheaply; it travels as a pickle file in the run's private temporary folder.

Also the one seam between workloads here: `probe_program(workload)` gives the `ProbeProgram` that says what a probe
of that kind of model does (the parent's side: default setting, checks, weights, inputs; the worker's side: build
the model, make a micro-batch, its loss). The runner and the worker call it and never branch on the model type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftpick.types import Architecture, Candidate, TrainingShape, Workload

if TYPE_CHECKING:
    from collections.abc import Callable

# Bumped when the worker's measurement changes meaning; part of every cache key. 2: probes run the setting's whole
# stack (optimizer, quantized base, loss kernel, trainer: probes.stack), no longer bf16 / AdamW / stock / plain.
PROTOCOL_VERSION = 2
# Test-only: JSON {"<method>": {"kind": "oom" | "error" | "crash" | "hang", "step": k, "above_micro_batch": m,
# "unless_checkpointing": bool}} makes the worker of that method fail at optimizer step k (1-based, warm-up
# included), only for micro-batches above m (default 0: always) and, with unless_checkpointing, only without
# gradient checkpointing. It lets the CPU tests drive out-of-memory retries, crashes and timeouts. With "rank": r
# only that rank of a multi-process probe (probes.torchrun) fails.
FAULTS_ENV = "PEFTPICK_PROBE_FAULTS"


@dataclass(frozen=True)
class ProbeJob:
    candidate: Candidate
    architecture: Architecture  # `config` builds the model when `weights` is None
    # the setting to run, the plan's whole TrainingShape: micro-batch, accumulation, checkpointing, dtype and the
    # stack (optimizer, quant, loss, trainer) the worker builds as the estimate models it (probes.stack)
    shape: TrainingShape
    weights: str | None  # folder or hub id of pretrained weights; None: random weights from the config
    device: str  # "cuda", "cuda:1" or "cpu"
    steps: int  # measured optimizer steps, after the warm-up
    warmup_steps: int
    learning_rate: float
    tokens_path: str  # the program's prepared inputs (causal LM: torch.save'd int64 [blocks, seq_len]); "": none
    seed: int = 0
    local_files_only: bool = True  # load hub weights from the local cache only
    world_size: int = 1  # >1: run under torchrun on this many GPUs (or CPU processes) with FSDP2 (probes.torchrun)

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.steps

    @property
    def workload(self) -> Workload:
        return self.architecture.workload

    @property
    def tokens_per_step(self) -> int:
        """Tokens one optimizer step processes (a denoiser's: latent image tokens), for `tokens_per_second`."""
        return probe_program(self.workload).tokens_per_step(self)


# ------------------------------------------------------------------------------------------- programs

# Which environment variable tells a worker, before its job arrives, which workload's libraries to import.
WORKLOAD_ENV = "PEFTPICK_PROBE_WORKLOAD"


class ProbeProgram:
    """What a probe does for one workload (worker.CausalLMProgram, diffusion.DenoiserProgram). The runner calls the
    parent's side (in the parent process: a program module imports nothing heavy at module level), the worker the
    worker's side.

    A workload's program is what its `probe_program` hook (peftpick.workloads) returns when called without
    arguments; see `probe_program`.
    """

    workload: Workload
    library_names: tuple[str, ...] = ("torch", "transformers", "peft", "peftpick")  # in cache keys and results
    default_methods: tuple[str, ...] = ()  # what `peftpick probe` measures without --methods

    # -- the parent's side

    def first_shape(self, arch: Architecture, shape: TrainingShape) -> TrainingShape:
        """The setting to run for `shape` (fill in what the workload needs, refuse what it cannot take)."""
        raise NotImplementedError

    def check(self, arch: Architecture, options: Any, device: str) -> None:
        """Refuse what cannot be probed before anything runs (PeftpickError): too big for the CPU, bad data."""
        raise NotImplementedError

    def weights_source(self, arch: Architecture, random_weights: bool) -> tuple[str | None, bool]:
        """Where the worker loads weights from (None: random weights) and whether only local files may be used."""
        raise NotImplementedError

    def load_data(self, options: Any, settings: list[TrainingShape]) -> Any:
        """The run's `ProbeData` (examples, a description for people, an identity for the cache)."""
        raise NotImplementedError

    def prepare_inputs(self, run: Any) -> tuple[str, tuple[str, ...]]:
        """Once per run, before its first job: (the file every job's `tokens_path` names, notes for the results).
        `run` is the runner's _ProbeRun: arch, data, settings, options, weights, local_only, folder, reporter."""
        raise NotImplementedError

    def tokens_per_step(self, job: ProbeJob) -> int:
        raise NotImplementedError

    def refusal(self, arch: Architecture, candidate: Candidate, shape: TrainingShape, device: str,
                world_size: int = 1) -> str | None:
        """Why this candidate's probe cannot run `shape`'s stack (optimizer, quant, loss, trainer) here, before a
        worker starts; None when it can. The default: only the optimizer may differ from the plain stack."""
        from peftpick.probes.stack import plain_only_refusal

        return plain_only_refusal(shape, self.workload.value)

    def runnable(self, shape: TrainingShape, device: str) -> tuple[TrainingShape, tuple[str, ...]]:
        """The stack a probe of `shape` runs on `device` and a note for each change (a kernel this device lacks)."""
        return shape, ()

    # -- the worker's side (torch and the model libraries are imported)

    def preload(self) -> None:
        """Import the heavy libraries, before the worker says it is ready."""
        raise NotImplementedError

    def build_model(self, job: ProbeJob, device: Any, dtype: Any) -> Any:
        """The bare model on `device` in `dtype`: pretrained weights from `job.weights`, else random ones."""
        raise NotImplementedError

    def prepare_for_training(self, job: ProbeJob, model: Any, stack: Any) -> Any:
        """After `build_model`, before gradient checkpointing and the adapter: what the stack does to the bare model
        (k-bit preparation, a loss kernel); `stack` (probes.stack.Stack) records it. The default: nothing."""
        return model

    def enable_gradient_checkpointing(self, model: Any) -> None:
        raise NotImplementedError

    def batches(self, job: ProbeJob, device: Any, dtype: Any) -> Callable[[int], Any]:
        """A function giving the next micro-batch of n samples, on `device`."""
        raise NotImplementedError

    def forward(self, model: Any, batch: Any) -> tuple[Any, Any]:
        """(what the forward returned, kept until the next forward as a training loop does; the loss)."""
        raise NotImplementedError


def probe_program(workload: Workload | str) -> ProbeProgram:
    """The program of `workload`: its `probe_program` hook in peftpick.workloads."""
    from peftpick.workloads import spec_for

    return spec_for(Workload(workload)).hook("probe_program")()
