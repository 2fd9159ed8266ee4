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
    """Where the fine-tuned result will be served (language-model engines) or used (image tools and libraries)."""

    VLLM = "vllm"
    SGLANG = "sglang"
    TGI = "tgi"
    LLAMACPP = "llamacpp"
    OLLAMA = "ollama"
    DIFFUSERS = "diffusers"
    COMFYUI = "comfyui"
    FORGE = "forge"
    INVOKEAI = "invokeai"
    NONE = "none"


class Workload(str, Enum):
    """What kind of model is fine-tuned; each stage asks `peftpick.workloads` what that means for it."""

    CAUSAL_LM = "causal-lm"
    DENOISER = "denoiser"


class Quant(str, Enum):
    """Quantization of the frozen base weights during training (bitsandbytes)."""

    NONE = "none"
    INT8 = "8bit"  # LLM.int8 (Linear8bitLt)
    INT4 = "4bit"  # NF4 with double quantization, QLoRA's recipe
    INT4_NO_DQ = "4bit-no-dq"  # NF4, absmax kept in float32


class Optimizer(str, Enum):
    """The optimizer of the training step."""

    ADAMW = "adamw"  # torch.optim.AdamW
    ADAMW_8BIT = "adamw-8bit"  # bitsandbytes AdamW8bit
    PAGED_ADAMW_8BIT = "paged-adamw-8bit"  # bitsandbytes PagedAdamW8bit
    ADAFACTOR = "adafactor"  # transformers.optimization.Adafactor
    SGD = "sgd"  # torch.optim.SGD with momentum
    LORA_FA = "lora-fa"  # PEFT's LoRA-FA optimizer (LoRA only)


OPTIMIZER_LABELS = {"adamw": "AdamW", "adamw-8bit": "8-bit AdamW (bitsandbytes)",
                    "paged-adamw-8bit": "paged 8-bit AdamW (bitsandbytes)", "adafactor": "Adafactor",
                    "sgd": "SGD with momentum", "lora-fa": "LoRA-FA"}


class LossKernel(str, Enum):
    """How the language-model loss is computed."""

    STOCK = "stock"  # the model's own: full logits, then cross-entropy
    LIGER = "liger"  # Liger's fused linear cross-entropy (no full logits)
    CHUNKED = "chunked"  # logits and loss over chunks of tokens


class Trainer(str, Enum):
    """The training loop."""

    PLAIN = "plain"  # out = model(...); out.loss.backward(); step
    HF = "hf"  # transformers' Trainer
    TRL = "trl"  # TRL's SFTTrainer


class Strategy(str, Enum):
    """How training is spread over several GPUs (estimator.sharding says what each holds per GPU)."""

    AUTO = "auto"  # the cheapest that fits, no sharding when one GPU is enough
    SINGLE = "single"  # one GPU, one process
    DDP = "ddp"  # torch DistributedDataParallel: everything replicated, gradients all-reduced
    FSDP2 = "fsdp2"  # torch fully_shard per decoder layer and the root: parameters, gradients, optimizer sharded
    FSDP2_OFFLOAD = "fsdp2-offload"  # FSDP2 with CPUOffloadPolicy: the shards live in host memory
    ZERO2 = "zero2"  # DeepSpeed ZeRO stage 2: gradients and optimizer state partitioned
    ZERO2_OFFLOAD = "zero2-offload"  # ZeRO-2 with the optimizer (and its step) on the CPU
    ZERO3 = "zero3"  # DeepSpeed ZeRO stage 3: parameters partitioned too
    ZERO3_OFFLOAD = "zero3-offload"  # ZeRO-3 with parameters and optimizer in host memory


class Goal(str, Enum):
    """What the ranking favours among candidates that pass every hard constraint."""

    BALANCED = "balanced"
    QUALITY = "quality"
    MEMORY = "memory"
    SPEED = "speed"


@dataclass(frozen=True)
class Denoiser:
    """What a diffusion denoiser trains on, beside its diffusers config (`Architecture.config`).

    Token counts follow from these: an image of H x W pixels becomes (H / vae_scale / patch) x (W / vae_scale /
    patch) tokens; a video of F frames has 1 + (F - 1) / vae_temporal latent frames.
    """

    family: str  # "flux2", "flux", "sd3", "sdxl", "wan", "qwen-image", ...
    diffusers_class: str  # "Flux2Transformer2DModel", "UNet2DConditionModel", ...
    objective: Literal["flow", "epsilon", "v"]  # flow matching (velocity), noise prediction, v-prediction
    latent_channels: int  # the VAE's latent channels (FLUX.2: 32, FLUX.1 / SD3 / Wan: 16, SDXL: 4)
    vae_scale: int  # spatial downsampling of the VAE (8 for all of them)
    patch: int  # latents per token side (FLUX packs 2 x 2, SD3 / Wan patchify 2 x 2, the SDXL UNet 1)
    text_dim: int  # width of the text embeddings the denoiser attends to
    text_len: int  # text tokens per prompt in the usual training setup
    pipeline_class: str = ""  # the diffusers pipeline, for snippets ("Flux2KleinPipeline")
    vae_temporal: int = 0  # video models: frames per latent frame (Wan: 4); 0 for image models
    pooled_dim: int = 0  # pooled text embedding (FLUX.1: 768, SD3: 2048, SDXL: 1280)
    guidance: bool = False  # a guidance-scale embedding is an input (FLUX.1-dev, FLUX.2-dev)
    added_time_ids: int = 0  # SDXL's micro-conditioning numbers (6)
    text_encoders: tuple[tuple[str, int], ...] = ()  # (name, parameters), resident when inputs are not cached
    vae_params: int = 0
    default_resolution: int = 1024
    default_frames: int = 0  # video models: frames of a clip in the usual setup


@dataclass(frozen=True)
class Architecture:
    """Architecture figures of a causal LM or a diffusion denoiser, and where they came from.

    `config` is the transformers config as a dict (what `PretrainedConfig.to_dict()` gives, or the bundled
    registry's subset of it), or for a denoiser its diffusers config; everything that builds a model goes through
    it, the figures are for people. A denoiser's figures: hidden_size is its inner width (heads x head size),
    num_layers its transformer blocks, vocab_size 0.
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
    denoiser: Denoiser | None = None  # set for diffusion denoisers
    # What a meta-device build of the config tells (knowledge.architectures.with_facts), worked out once
    # and kept with the cached architecture, so that a later run needs no build (and no torch); {} = not yet known.
    facts: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def workload(self) -> Workload:
        return Workload.DENOISER if self.denoiser is not None else Workload.CAUSAL_LM


@dataclass(frozen=True)
class TrainingShape:
    """One training setting: the worst batch is every sequence filled to `seq_len`.

    Denoisers: `resolution` (pixels per side) and `frames` (video) set the latent tokens, `seq_len` is unused;
    `cached_inputs` says the text embeddings and latents were computed beforehand (text encoders and VAE off the
    GPU), the usual low-memory recipe and the PEFT image suite's.
    """

    batch_size: int = 4
    seq_len: int = 768
    gradient_checkpointing: bool = False
    gradient_accumulation: int = 1
    optimizer: str = "adamw"  # an Optimizer value
    dtype: str = "bfloat16"
    resolution: int | None = None
    frames: int | None = None
    cached_inputs: bool = True
    quant: str = "none"  # a Quant value: the frozen base weights' storage
    loss: str = "stock"  # a LossKernel value
    trainer: str = "plain"  # a Trainer value

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
    optimizer: str = "adamw"  # the method's own optimizer: "adamw", or "lora-fa" for LoRA-FA
    benchmark_run: str | None = None  # experiment the settings were taken from
    notes: tuple[str, ...] = ()
    # the installed PEFT config class's defaults that are plain literals (what the report's snippet leaves out)
    peft_defaults: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    task_type: str | None = "CAUSAL_LM"  # PEFT's task type; None for a bare module (a diffusers denoiser)

    def peft_config(self):
        """A `peft.PeftConfig` that `get_peft_model` accepts, or None for full fine-tuning."""
        if self.peft_config_class is None:
            return None
        import peft

        cls = getattr(peft, self.peft_config_class)
        return cls(task_type=self.task_type, **self.peft_kwargs)

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
    # the traced model's parameter shapes by FSDP unit (estimator.sharding.ParameterLayout's JSON form), from
    # which per-GPU figures of sharded strategies follow; {} when not traced
    layout: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    gpus: int = 1  # the figures are per GPU of a run over this many
    strategy: str = "single"  # a Strategy value
    host_bytes: int = 0  # host (CPU) memory the strategy keeps per node: offloaded shards and optimizer state
    # what one GPU holds of the training state once every gradient exists: "parameters", "gradients",
    # "optimizer state" (bytes); {} on one GPU
    rank_state: dict[str, int] = field(default_factory=dict, compare=False)

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
    gpus: int = 1  # ranks of a multi-GPU probe (FSDP2 under torchrun); the peaks are the busiest rank's
    ranks: tuple[dict[str, Any], ...] = ()  # each rank's status, peaks and step time, in rank order
    # what ran, by name: optimizer, quant, loss, trainer (TrainingShape values), optimizer_class, trainer_run, ...
    stack: dict[str, str] = field(default_factory=dict)


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
    loss: str = "stock"  # a LossKernel value: the planner may pick Liger's fused cross-entropy
    # what the loss kernel saved against the stock loss (bytes reserved, measured on plain LoRA), when it was picked
    loss_saving_bytes: int | None = None
    # optimizer-state bytes the planner's switch to 8-bit AdamW saved against AdamW, when it switched
    optimizer_saving_bytes: int | None = None

    @property
    def optimizer(self) -> str:
        """The optimizer the plan trains with (an Optimizer value)."""
        return self.estimate.shape.optimizer

    @property
    def gpus(self) -> int:
        return self.estimate.gpus

    @property
    def strategy(self) -> str:
        return self.estimate.strategy


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
    drift: float | None = None  # image suite: how far unrelated prompts' images move (lower keeps more); None: unknown

    def peft_config(self):
        return self.candidate.peft_config()

    def training_arguments(self, output_dir: str, **overrides):
        """A transformers.TrainingArguments carrying this plan (peftpick.report.trainer_config)."""
        from peftpick.report.trainer_config import training_arguments

        return training_arguments(self, output_dir, **overrides)

    def sft_config(self, output_dir: str, **overrides):
        """A trl.SFTConfig carrying this plan (peftpick.report.trainer_config)."""
        from peftpick.report.trainer_config import sft_config

        return sft_config(self, output_dir, **overrides)

    def trainer_optimizers(self, model):
        """The Trainer's `optimizers=` pair for this plan on the PeftModel `model` (LoRA-FA's own optimizer, else
        (None, None)); peftpick.report.trainer_config."""
        from peftpick.report.trainer_config import trainer_optimizers

        return trainer_optimizers(self, model)

    @property
    def method(self) -> str:
        return self.candidate.method

    @property
    def estimate(self) -> MemoryEstimate:
        return self.plan.estimate


@dataclass(frozen=True)
class LengthProfile:
    """Token lengths of the user's training examples, after the model's tokenizer and chat template."""

    examples: int
    mean: float
    median: int
    p95: int
    longest: int
    over_seq_len: int  # examples longer than --seq-len (truncated)
    tokenizer: str
    source: str  # what was read, e.g. "train.jsonl: 1,000 records read (...)"


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
    resolution: int | None = None  # denoisers: pixels per side (None: the model's usual)
    frames: int | None = None  # video denoisers: frames per clip
    cached_inputs: bool = True  # denoisers: text embeddings and latents computed beforehand
    serve_given: bool = True  # False: `serve` is the usual stack for the model's kind, chosen once it is known
    batch_given: bool = True  # False: `batch_size` is the usual effective batch for the model's kind
    loss: LossKernel | None = None  # None: stock, or Liger's fused cross-entropy where it is needed to fit
    trainer: Trainer = Trainer.PLAIN
    packing: bool = False  # examples packed into rows of seq_len tokens (needs the data)
    gpus: int = 1  # GPUs of `vram_gib` each on one node
    strategy: Strategy = Strategy.AUTO
    optimizer: Optimizer | None = None  # None: each method's own (AdamW; LoRA-FA's), 8-bit AdamW where needed to fit


@dataclass(frozen=True)
class Alternative:
    """Another way to train the same model, planned beside the ranking (the single-GPU QLoRA plan beside a
    multi-GPU one), and which of the two is cheaper."""

    label: str  # "QLoRA on 1 GPU"
    candidate: Candidate
    plan: TrainingPlan
    comparison: str  # one sentence: which is cheaper, in GPUs and memory


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
    lengths: LengthProfile | None = None  # the user's data, when given and the tokenizer is on this machine
    uncertainty: tuple[str, ...] = ()  # which top candidates the evidence cannot order, and what would settle it
    probes: tuple[ProbeResult, ...] = ()  # every probe run for this recommendation (also those later excluded)
    alternative: Alternative | None = None  # with --gpus > 1: the single-GPU QLoRA plan

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
