"""Data types that cross stages (model -> probes/estimator -> knowledge -> recommender -> report).

Only plain dataclasses and enums live here, so every stage can import them without importing another
stage. Sizes are bytes (int) everywhere; conversion to GiB (2**30) happens only when printing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

GIB = 2**30


class Serve(str, Enum):
    """Where the fine-tuned result will be served."""

    VLLM = "vllm"
    SGLANG = "sglang"
    TGI = "tgi"
    LLAMACPP = "llamacpp"
    OLLAMA = "ollama"
    NONE = "none"


class Quant(str, Enum):
    """Quantization of the frozen base weights during training."""

    NONE = "none"
    INT8 = "8bit"
    INT4 = "4bit"


class Goal(str, Enum):
    """What the ranking favours among candidates that pass every hard constraint."""

    BALANCED = "balanced"
    QUALITY = "quality"
    MEMORY = "memory"
    SPEED = "speed"


@dataclass(frozen=True)
class Architecture:
    """Architecture figures of a causal LM, and where they came from.

    `config` is the transformers config as a dict (what `PretrainedConfig.to_dict()` gives, or the bundled
    registry's subset of it); everything that builds a model goes through it, the figures are for people.
    """

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    num_experts: int = 0
    experts_per_token: int = 0
    dtype: str = "bfloat16"
    source: str = ""
    hub_id: str | None = None
    local_path: str | None = None
    config: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class TrainingShape:
    """One training setting: the worst batch is every sequence filled to `seq_len`."""

    batch_size: int = 4
    seq_len: int = 768
    gradient_checkpointing: bool = False
    gradient_accumulation: int = 1
    optimizer: Literal["adamw", "lora-fa"] = "adamw"
    dtype: str = "bfloat16"

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.gradient_accumulation


@dataclass(frozen=True)
class Candidate:
    """A concrete method configuration for one architecture.

    `peft_kwargs` are the keyword arguments of the PEFT config class named by `peft_config_class`
    (None for full fine-tuning), with target modules already resolved for the architecture.
    """

    method: str  # catalogue key, e.g. "rslora"
    display_name: str  # e.g. "rsLoRA"
    peft_type: str | None  # PEFT's PeftType name ("LORA", "OFT", ...); None for full fine-tuning
    peft_config_class: str | None  # e.g. "LoraConfig"
    peft_kwargs: dict[str, Any] = field(default_factory=dict)
    learning_rate: float = 1e-4
    optimizer: Literal["adamw", "lora-fa"] = "adamw"
    benchmark_run: str | None = None  # experiment the settings were taken from
    notes: tuple[str, ...] = ()

    def peft_config(self):
        """A `peft.PeftConfig` that `get_peft_model` accepts, or None for full fine-tuning."""
        if self.peft_config_class is None:
            return None
        import peft

        cls = getattr(peft, self.peft_config_class)
        return cls(task_type="CAUSAL_LM", **self.peft_kwargs)

    @property
    def rank(self) -> int | None:
        value = self.peft_kwargs.get("r")
        return int(value) if isinstance(value, int) else None

    def with_kwargs(self, **changes: Any) -> Candidate:
        return dataclasses.replace(self, peft_kwargs={**self.peft_kwargs, **changes})


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak GPU memory of a training run. `breakdown` parts add up to `peak_allocated_bytes`."""

    peak_allocated_bytes: int
    peak_reserved_bytes: int
    breakdown: dict[str, int]
    trainable_params: int
    total_params: int
    shape: TrainingShape
    adapter_file_bytes: int | None = None  # what save_pretrained writes (the whole model for full fine-tuning)
    assumptions: tuple[str, ...] = ()
    source: str = "estimated"  # or "measured on <GPU>"

    @property
    def peak_allocated_gib(self) -> float:
        return self.peak_allocated_bytes / GIB

    @property
    def peak_reserved_gib(self) -> float:
        return self.peak_reserved_bytes / GIB


@dataclass(frozen=True)
class ProbeResult:
    """What one micro-training measured. Memory fields are None when not measured (CPU).

    `shape` is the setting measured: the cheapest that fits when cheaper ones had to be tried after an
    out-of-memory (those are in `oom_settings`), the last one tried when none fits (status "oom").
    """

    method: str
    status: Literal["ok", "oom", "error"]
    shape: TrainingShape
    device: str  # "NVIDIA H100 80GB HBM3" or "cpu"
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    nvml_used_bytes: int | None = None  # device memory used as NVML sees it, minus the baseline
    tokens_per_second: float | None = None
    step_seconds: float | None = None
    losses: tuple[float, ...] = ()
    loss_slope: float | None = None  # per optimizer step, least squares
    loss_slope_stderr: float | None = None
    wall_seconds: float | None = None
    trainable_params: int | None = None
    error: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    from_cache: bool = False
    display_name: str = ""
    requested_shape: TrainingShape | None = None  # the setting asked for, tried first
    oom_settings: tuple[TrainingShape, ...] = ()  # settings tried that ran out of memory, in order
    total_params: int | None = None
    breakdown: dict[str, int] = field(default_factory=dict)  # bytes by part, adding up to peak_allocated_bytes
    learning_rate: float | None = None
    data: str = ""  # what the probe trained on
    phase_seconds: dict[str, float] = field(default_factory=dict)  # where the wall time went
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class BenchmarkEvidence:
    """One benchmark run that backs a candidate's expected quality."""

    benchmark: str  # "MetaMathQA" or "image-gen"
    experiment: str  # e.g. "lora/llama-3.2-3B-rank64-rslora"
    metric: str  # "test accuracy" or "test DINO similarity"
    score: float
    lora_score: float  # plain LoRA's best-known default run on the same benchmark
    lora_experiment: str
    model: str  # the benchmark's base model
    gpu: str
    source_commit: str

    @property
    def relative_to_lora(self) -> float:
        return self.score / self.lora_score if self.lora_score else float("nan")


ServingRoute = Literal["native", "merge", "convert", "cannot", "not needed"]


@dataclass(frozen=True)
class ServingVerdict:
    """How a candidate (or a saved adapter) gets served on one stack.

    `launch` holds the command lines that serve the result (after the conversion or merge the route names);
    `conversion` names the conversion a "convert" route needs ("initial-model": PEFT's
    path_initial_model_for_weight_conversion, exact; "rescale": each module's scale baked into lora_B, exact; "svd": approximate) and
    `rank_after` the rank of the adapter it writes; `versions` says which engine version the facts are for.
    """

    route: ServingRoute
    reason: str
    source: str = ""
    launch: tuple[str, ...] = ()
    conversion: str | None = None
    rank_after: int | None = None
    versions: str = ""


@dataclass(frozen=True)
class Exclusion:
    method: str
    display_name: str
    constraint: Literal["memory", "serving", "multi-adapter", "quantization", "architecture"]
    reason: str


Fit = Literal["fits", "marginal", "does not fit"]


@dataclass(frozen=True)
class TrainingPlan:
    """Settings that fit the VRAM while keeping the requested effective batch."""

    micro_batch: int
    gradient_accumulation: int
    gradient_checkpointing: bool
    estimate: MemoryEstimate
    fit: Fit


@dataclass(frozen=True)
class QualityPrediction:
    """Expected benchmark score relative to plain LoRA (1.0 = LoRA), its interval, and where the figure comes from."""

    relative: float
    low: float
    high: float
    basis: str  # one sentence for the report
    source: Literal["benchmark run", "model"] = "model"
    level: float = 0.8  # the interval's intended coverage
    used_probe: bool = False  # early-signal features from the user's probe went into the figure
    non_learning: str | None = None  # why the probe says this method does not learn; None when it does / no probe

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


@dataclass(frozen=True)
class RankedCandidate:
    candidate: Candidate
    plan: TrainingPlan
    serving: ServingVerdict
    evidence: BenchmarkEvidence | None
    adapter_bytes: int
    score: float  # the --goal utility (higher is better)
    reason: str  # one line: why it ranks where it does
    probe: ProbeResult | None = None
    prefer_when: str = ""  # when a user should take this one over the others
    quality: QualityPrediction | None = None
    relative_speed: float | None = None  # training steps per second relative to plain LoRA (1.0 = LoRA's speed)
    speed_source: str = ""  # "benchmark <run>" or "measured on <GPU>"
    pareto: bool = True  # no other candidate is at least as good on every axis and better on one
    dominated_by: tuple[str, ...] = ()  # display names of candidates that dominate it
    flags: tuple[str, ...] = ()  # warnings that ranked it down (e.g. its probe loss does not fall)

    def peft_config(self):
        return self.candidate.peft_config()

    @property
    def method(self) -> str:
        return self.candidate.method

    @property
    def estimate(self) -> MemoryEstimate:
        return self.plan.estimate


@dataclass(frozen=True)
class Request:
    """What the user asked for, with defaults filled in and validated (recommender.validate_request)."""

    model: str
    vram_gib: float
    serve: Serve = Serve.VLLM
    multi_adapter: bool = False
    quant: Quant = Quant.NONE
    goal: Goal = Goal.BALANCED
    seq_len: int = 768
    batch_size: int = 4
    vram_source: str = "given"  # "given" or "detected: <GPU name>"


@dataclass(frozen=True)
class Recommendation:
    """What `peftpick.recommend` returns: candidates ranked best first, exclusions with reasons."""

    request: Request
    architecture: Architecture
    assumptions: tuple[str, ...]
    ranked: tuple[RankedCandidate, ...]
    excluded: tuple[Exclusion, ...]
    gpu: str | None = None  # the GPU the figures were measured on, None when estimated
    verdict: str = ""  # one paragraph for people, first thing the report prints
    goal_weights: dict[str, float] = field(default_factory=dict)  # the utility's weights for the request's goal
    uncertainty: tuple[str, ...] = ()  # which top candidates the evidence cannot order, and what would settle it
    probes: tuple[ProbeResult, ...] = ()  # every probe run for this recommendation (also those later excluded)

    @property
    def best(self) -> RankedCandidate | None:
        return self.ranked[0] if self.ranked else None

    @property
    def runner_up(self) -> RankedCandidate | None:
        return self.ranked[1] if len(self.ranked) > 1 else None

    def to_dict(self) -> dict[str, Any]:
        """Machine-readable form with stable keys (documented in README)."""
        from peftpick.report import to_dict

        return to_dict(self)

    def report(self, fmt: Literal["markdown", "html", "text"] = "markdown") -> str:
        from peftpick.report import render

        return render(self, fmt)
