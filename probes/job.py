"""What the parent hands a worker process: one candidate in one training setting. Plain data, no heavy imports,
so both sides can import it cheaply; it travels as a pickle file in the run's private temporary folder."""

from __future__ import annotations

from dataclasses import dataclass

from peftpick.types import Architecture, Candidate, TrainingShape

# Bumped when the worker's measurement changes meaning; part of every cache key.
PROTOCOL_VERSION = 1
# Test-only: JSON {"<method>": {"kind": "oom" | "error" | "crash" | "hang", "step": k, "above_micro_batch": m,
# "unless_checkpointing": bool}} makes the worker of that method fail at optimizer step k (1-based, warm-up
# included), only for micro-batches above m (default 0: always) and, with unless_checkpointing, only without
# gradient checkpointing. It lets the CPU tests drive out-of-memory retries, crashes and timeouts.
FAULTS_ENV = "PEFTPICK_PROBE_FAULTS"


@dataclass(frozen=True)
class ProbeJob:
    candidate: Candidate
    architecture: Architecture  # `config` builds the model when `weights` is None
    shape: TrainingShape  # the setting to run: micro-batch, accumulation, checkpointing, optimizer, dtype
    weights: str | None  # folder or hub id of pretrained weights; None: random weights from the config
    device: str  # "cuda", "cuda:1" or "cpu"
    steps: int  # measured optimizer steps, after the warm-up
    warmup_steps: int
    learning_rate: float
    tokens_path: str  # torch.save'd int64 tensor [blocks, seq_len]
    seed: int = 0
    local_files_only: bool = True  # load hub weights from the local cache only

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.steps

    @property
    def tokens_per_step(self) -> int:
        return self.shape.batch_size * self.shape.gradient_accumulation * self.shape.seq_len
