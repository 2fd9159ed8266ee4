"""The machine-readable form of a Recommendation (`to_dict`), schema version 1.

Keys are stable: a key is never renamed or dropped within a schema version, and a value that is unknown is
null, never missing. Everything is JSON-serialisable with `json.dumps(..., allow_nan=False)`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from enum import Enum
from pathlib import PurePath
from typing import Any

from peftpick.report.formatting import ALPHA_KEYS, margin_gib, memory_source
from peftpick.report.snippet import snippet_for
from peftpick.types import (
    GIB,
    Architecture,
    BenchmarkEvidence,
    Exclusion,
    MemoryEstimate,
    ProbeResult,
    QualityPrediction,
    RankedCandidate,
    Recommendation,
    Request,
)

SCHEMA_VERSION = 1

# Settings reported under their own key in "settings"; everything else goes to "other_kwargs".
_OWN_SETTING_KEYS = frozenset({"r", "target_modules", "task_type"})


def json_safe(value: Any) -> Any:
    """`value` with only JSON types: NaN/inf -> None, enums -> value, tuples/sets -> lists, paths -> str."""
    if isinstance(value, Enum):
        return json_safe(value.value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return [json_safe(item) for item in sorted(value, key=str)]
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, PurePath):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return json_safe(value.item())
    return str(value)


def request_to_dict(request: Request) -> dict[str, Any]:
    return {
        "model": request.model,
        "vram_gib": json_safe(float(request.vram_gib)),
        "serve": json_safe(request.serve),
        "multi_adapter": bool(request.multi_adapter),
        "quant": json_safe(request.quant),
        "goal": json_safe(request.goal),
        "seq_len": int(request.seq_len),
        "batch_size": int(request.batch_size),
        "vram_source": request.vram_source,
        "resolution": request.resolution,
        "frames": request.frames,
        # image and video models only (a language model's request has no resolution)
        "cached_inputs": bool(request.cached_inputs) if request.resolution is not None else None,
        "loss": json_safe(request.loss) if request.loss is not None else None,
        "optimizer": json_safe(request.optimizer) if request.optimizer is not None else None,
        "trainer": json_safe(request.trainer),
        "packing": bool(request.packing),
        "gpus": int(request.gpus),
        "strategy": json_safe(request.strategy),
    }


def architecture_to_dict(arch: Architecture) -> dict[str, Any]:
    return {
        "name": arch.name,
        "model_type": arch.model_type,
        "hidden_size": arch.hidden_size,
        "num_layers": arch.num_layers,
        "num_heads": arch.num_heads,
        "num_kv_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        "intermediate_size": arch.intermediate_size,
        "vocab_size": arch.vocab_size,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "num_experts": arch.num_experts,
        "experts_per_token": arch.experts_per_token,
        "dtype": arch.dtype,
        "hub_id": arch.hub_id,
        "local_path": arch.local_path,
        "source": arch.source,
        "workload": arch.workload.value,
        "denoiser": json_safe(dataclasses.asdict(arch.denoiser)) if arch.denoiser is not None else None,
    }


def estimate_to_dict(estimate: MemoryEstimate) -> dict[str, Any]:
    """One memory estimate (also what `peftpick estimate --json` prints)."""
    shape = estimate.shape
    return {
        "peak_allocated_bytes": int(estimate.peak_allocated_bytes),
        "peak_reserved_bytes": int(estimate.peak_reserved_bytes),
        "peak_allocated_gib": round(estimate.peak_allocated_bytes / GIB, 4),
        "peak_reserved_gib": round(estimate.peak_reserved_bytes / GIB, 4),
        "breakdown": {str(part): int(n_bytes) for part, n_bytes in estimate.breakdown.items()},
        "trainable_params": int(estimate.trainable_params),
        "total_params": int(estimate.total_params),
        "shape": {
            "batch_size": shape.batch_size,
            "seq_len": shape.seq_len,
            "gradient_checkpointing": shape.gradient_checkpointing,
            "gradient_accumulation": shape.gradient_accumulation,
            "optimizer": shape.optimizer,
            "dtype": shape.dtype,
        },
        "source": memory_source(estimate),
        "assumptions": list(estimate.assumptions),
        "gpus": int(estimate.gpus),
        "strategy": estimate.strategy,
        "rank_state": {str(k): int(v) for k, v in estimate.rank_state.items()},
        "host_bytes": int(estimate.host_bytes),
    }


def evidence_to_dict(evidence: BenchmarkEvidence | None) -> dict[str, Any] | None:
    if evidence is None:
        return None
    return {
        "benchmark": evidence.benchmark,
        "experiment": evidence.experiment,
        "metric": evidence.metric,
        "score": json_safe(float(evidence.score)),
        "lora_score": json_safe(float(evidence.lora_score)),
        "relative_to_lora": json_safe(float(evidence.relative_to_lora)),
        "lora_experiment": evidence.lora_experiment,
        "model": evidence.model,
        "gpu": evidence.gpu,
        "source_commit": evidence.source_commit,
    }


def probe_to_dict(probe: ProbeResult | None) -> dict[str, Any] | None:
    if probe is None:
        return None
    return json_safe({
        "status": probe.status,
        "device": probe.device,
        "peak_allocated_bytes": probe.peak_allocated_bytes,
        "peak_reserved_bytes": probe.peak_reserved_bytes,
        "nvml_used_bytes": probe.nvml_used_bytes,
        "tokens_per_second": probe.tokens_per_second,
        "step_seconds": probe.step_seconds,
        "losses": list(probe.losses),
        "loss_slope": probe.loss_slope,
        "loss_slope_stderr": probe.loss_slope_stderr,
        "wall_seconds": probe.wall_seconds,
        "error": probe.error,
        "from_cache": probe.from_cache,
    })


def quality_to_dict(quality: QualityPrediction | None) -> dict[str, Any] | None:
    if quality is None:
        return None
    return json_safe({
        "relative_to_lora": quality.relative,
        "low": quality.low,
        "high": quality.high,
        "level": quality.level,
        "source": quality.source,
        "used_probe": quality.used_probe,
        "non_learning": quality.non_learning,
        "basis": quality.basis,
    })


def _settings(ranked: RankedCandidate) -> dict[str, Any]:
    candidate = ranked.candidate
    kwargs = candidate.peft_kwargs
    alpha_key = next((key for key in ALPHA_KEYS if kwargs.get(key) is not None), None)
    return {
        "rank": json_safe(kwargs.get("r")),
        "alpha": json_safe(kwargs[alpha_key]) if alpha_key else None,
        "target_modules": json_safe(kwargs.get("target_modules")),
        "learning_rate": json_safe(float(candidate.learning_rate)),
        "optimizer": candidate.optimizer,
        "other_kwargs": json_safe({
            key: value for key, value in kwargs.items() if key not in _OWN_SETTING_KEYS and key != alpha_key
        }),
    }


def launch_to_dict(ranked: RankedCandidate, rec: Recommendation | None) -> dict[str, Any] | None:
    from peftpick.report.launch import launch_for

    launch = launch_for(ranked, rec) if rec is not None else None
    if launch is None:
        return None
    return {"command": launch.command, "files": {file.name: file.text for file in launch.files},
            "saving": launch.saving}


def alternative_to_dict(rec: Recommendation) -> dict[str, Any] | None:
    alternative = rec.alternative
    if alternative is None:
        return None
    plan = alternative.plan
    return {"label": alternative.label, "method": alternative.candidate.method, "fit": plan.fit,
            "micro_batch": plan.micro_batch, "gradient_accumulation": plan.gradient_accumulation,
            "gradient_checkpointing": plan.gradient_checkpointing, "memory": estimate_to_dict(plan.estimate),
            "comparison": alternative.comparison}


def ranked_to_dict(ranked: RankedCandidate, position: int, vram_gib: float,
                   rec: Recommendation | None = None) -> dict[str, Any]:
    candidate, plan, estimate = ranked.candidate, ranked.plan, ranked.estimate
    memory = estimate_to_dict(estimate)
    return {
        "rank": position,
        "method": candidate.method,
        "display_name": candidate.display_name,
        "peft_type": candidate.peft_type,
        "peft_config_class": candidate.peft_config_class,
        "settings": _settings(ranked),
        "benchmark_run": candidate.benchmark_run,
        "trainable_params": int(estimate.trainable_params),
        "total_params": int(estimate.total_params),
        "adapter_bytes": int(ranked.adapter_bytes),
        "memory": {
            "peak_allocated_bytes": memory["peak_allocated_bytes"],
            "peak_reserved_bytes": memory["peak_reserved_bytes"],
            "peak_allocated_gib": memory["peak_allocated_gib"],
            "peak_reserved_gib": memory["peak_reserved_gib"],
            "breakdown": memory["breakdown"],
            "source": memory["source"],
            "fit": plan.fit,
            "margin_gib": json_safe(round(margin_gib(estimate, vram_gib), 4)),
            "assumptions": memory["assumptions"],
        },
        "plan": {
            "micro_batch": plan.micro_batch,
            "gradient_accumulation": plan.gradient_accumulation,
            "effective_batch": plan.micro_batch * plan.gradient_accumulation * plan.gpus,
            "gpus": plan.gpus,
            "strategy": plan.strategy,
            "launch": launch_to_dict(ranked, rec),
            "gradient_checkpointing": plan.gradient_checkpointing,
            "dtype": estimate.shape.dtype,
            "seq_len": estimate.shape.seq_len,
            "loss": plan.loss,
            "loss_saving_bytes": plan.loss_saving_bytes,
            "optimizer": plan.optimizer,
            "optimizer_saving_bytes": plan.optimizer_saving_bytes,
        },
        "evidence": evidence_to_dict(ranked.evidence),
        "serving": {"route": ranked.serving.route, "reason": ranked.serving.reason, "source": ranked.serving.source,
                    "launch": list(ranked.serving.launch), "conversion": ranked.serving.conversion,
                    "rank_after": ranked.serving.rank_after, "versions": ranked.serving.versions},
        "probe": probe_to_dict(ranked.probe),
        "quality": quality_to_dict(ranked.quality),
        "speed": {"relative_to_lora": json_safe(ranked.relative_speed), "source": ranked.speed_source},
        "drift": json_safe(ranked.drift),
        "pareto": bool(ranked.pareto),
        "dominated_by": list(ranked.dominated_by),
        "flags": list(ranked.flags),
        "score": json_safe(float(ranked.score)),
        "reason": ranked.reason,
        "prefer_when": ranked.prefer_when,
        "notes": list(candidate.notes),
    }


def exclusion_to_dict(exclusion: Exclusion) -> dict[str, Any]:
    return {
        "method": exclusion.method,
        "display_name": exclusion.display_name,
        "constraint": exclusion.constraint,
        "reason": exclusion.reason,
    }


def to_dict(rec: Recommendation) -> dict[str, Any]:
    """`rec` as plain JSON data (schema_version 1). Sizes are bytes unless the key ends in `_gib` (2**30 bytes).

    | key | type | meaning |
    |---|---|---|
    | `schema_version` | int | 1; bumped when a key changes meaning or goes away |
    | `peftpick_version` | str | version of peftpick that wrote it |
    | `request` | object | what was asked: `model` (as given), `vram_gib` (GPU memory the plan must fit), `vram_source` ("given" or "detected: <GPU>"), `serve`, `multi_adapter`, `quant`, `goal`, `seq_len` (tokens), `batch_size` (effective batch), `resolution` / `frames` (image and video models; null otherwise), `cached_inputs` (text embeddings and latents computed beforehand), `loss` (the loss kernel asked for; null: the planner's choice), `optimizer` (asked for; null: each method's own, 8-bit AdamW where only it fits), `trainer`, `packing` |
    | `architecture` | object | figures of the resolved model: `name`, `model_type`, `hidden_size`, `num_layers`, `num_heads`, `num_kv_heads`, `head_dim`, `intermediate_size`, `vocab_size`, `tie_word_embeddings`, `num_experts`, `experts_per_token`, `dtype`, `hub_id`, `local_path`, `source` (where the figures came from), `workload` ("causal-lm" or "denoiser") and `denoiser` (null for language models; else family, diffusers_class, objective, latent_channels, vae_scale, patch, text_dim, text_len, ...) |
    | `gpu` | str \| null | GPU the memory figures were measured on; null when estimated |
    | `assumptions` | [str] | what the figures assume |
    | `verdict` | str | one paragraph for people |
    | `ranked` | [object] | candidates that pass every constraint, best first; keys below |
    | `ranked[].rank` | int | 1 = best |
    | `ranked[].method` | str | catalogue key, e.g. "rslora" |
    | `ranked[].display_name` | str | e.g. "rsLoRA" |
    | `ranked[].peft_type` | str \| null | PEFT's PeftType name; null for full fine-tuning |
    | `ranked[].peft_config_class` | str \| null | e.g. "LoraConfig"; null for full fine-tuning |
    | `ranked[].settings` | object | `rank`, `alpha`, `target_modules`, `learning_rate`, `optimizer` ("adamw" / "lora-fa"), `other_kwargs` (the remaining PEFT config kwargs) |
    | `ranked[].benchmark_run` | str \| null | benchmark experiment the settings were taken from |
    | `ranked[].trainable_params` | int | parameters that train |
    | `ranked[].total_params` | int | parameters of the adapted model |
    | `ranked[].adapter_bytes` | int | size of the saved adapter (full fine-tuning: the model) |
    | `ranked[].memory` | object | `peak_allocated_bytes`, `peak_reserved_bytes` (the figure that must fit), `peak_allocated_gib`, `peak_reserved_gib`, `breakdown` (bytes allocated at the peak by part: `weights`, `adapter`, `grads`, `optimizer`, `activations`, `logits/loss`, `overhead`), `source` ("estimated" or "measured on <GPU>"), `fit` ("fits" / "marginal" / "does not fit"), `margin_gib` (VRAM minus peak reserved; negative = short), `assumptions` |
    | `ranked[].plan` | object | `micro_batch`, `gradient_accumulation`, `effective_batch`, `gradient_checkpointing`, `dtype`, `seq_len` (the longest row the estimate holds), `loss` ("stock" / "liger" / "chunked"), `loss_saving_bytes` (what Liger saved plain LoRA when the planner chose it; else null), `optimizer` (what the plan trains with: "adamw", "adamw-8bit", "paged-adamw-8bit", "adafactor", "sgd", "lora-fa"), `optimizer_saving_bytes` (optimizer state 8-bit AdamW saved against AdamW when the planner switched to it; else null), `gpus`, `strategy` ("single", "ddp", "fsdp2", ...; memory figures are per GPU), `launch` (multi-GPU: `command`, `files` {name: text}, `saving`; else null) |
    | `ranked[].evidence` | object \| null | `benchmark`, `experiment`, `metric`, `score`, `lora_score`, `relative_to_lora` (score / LoRA reference score), `lora_experiment`, `model` (the benchmark's base model), `gpu`, `source_commit`; null without a benchmark run |
    | `ranked[].serving` | object | `route` ("native" / "merge" / "convert" / "cannot" / "not needed"), `reason`, `source`, `launch` (command lines that serve the result), `conversion` ("initial-model" / "rescale" / "svd" / null), `rank_after` (rank of the converted adapter), `versions` (which engine version the facts are for) |
    | `ranked[].probe` | object \| null | micro-training measurement when one was run: `status`, `device`, `peak_allocated_bytes`, `peak_reserved_bytes`, `nvml_used_bytes`, `tokens_per_second`, `step_seconds`, `losses`, `loss_slope`, `loss_slope_stderr`, `wall_seconds`, `error`, `from_cache` |
    | `ranked[].quality` | object \| null | expected quality: `relative_to_lora` (score / plain LoRA's; 1.0 = LoRA), `low`, `high` (interval), `level` (its intended coverage, 0.8), `source` ("benchmark run" or "model"), `used_probe` (the user's probe losses went into it), `non_learning` (why the probe loss does not fall; null when it does or nothing was probed), `basis` (one sentence: where the figure comes from) |
    | `ranked[].speed` | object | `relative_to_lora` (training steps per second relative to plain LoRA, with the plan's checkpointing; null when unknown), `source` ("benchmark <run>" or "measured on <GPU>") |
    | `ranked[].drift` | number | image models: how far the benchmark run moved the images of unrelated prompts (lower keeps more of the base model); null when unknown or for language models |
    | `ranked[].pareto` | bool | on the Pareto front over expected quality, peak memory, speed and adapter size |
    | `ranked[].dominated_by` | [str] | display names of candidates at least as good on all four and better on one |
    | `ranked[].flags` | [str] | warnings that ranked it down (e.g. its probe loss does not fall) |
    | `ranked[].score` | float \| null | the --goal utility (higher is better); see `goal_weights` |
    | `ranked[].reason` | str | why it ranks where it does |
    | `ranked[].prefer_when` | str | when to take it over the others ("" if not stated) |
    | `ranked[].notes` | [str] | method notes from the catalogue |
    | `excluded` | [object] | methods ruled out: `method`, `display_name`, `constraint` (memory / serving / multi-adapter / quantization / architecture), `reason` |
    | `goal_weights` | object | the utility's weights for the request's goal: `quality`, `memory`, `speed`, `size` |
    | `uncertainty` | [str] | for each group of top candidates whose quality intervals overlap: which, and what would settle it |
    | `probes` | [object] | every probe run for this recommendation (the `ranked[].probe` keys plus `method`); empty when nothing was probed |
    | `lengths` | object \| null | token lengths of `--data` with the model's tokenizer: `examples`, `mean`, `median`, `p95`, `longest`, `over_seq_len`, `tokenizer`, `source`; null without data or tokenizer |
    | `best` | str \| null | method key of ranked[0] |
    | `runner_up` | str \| null | method key of ranked[1] |
    | `peft_snippet` | str \| null | Python that sets up the best candidate; null when nothing is ranked |
    | `alternative` | object \| null | with `--gpus` > 1: the single-GPU QLoRA plan: `label`, `method`, `fit`, `micro_batch`, `gradient_accumulation`, `gradient_checkpointing`, `memory` (as `ranked[].memory`'s estimate keys), `comparison` (which plan is cheaper) |
    """
    from peftpick import __version__

    vram_gib = float(rec.request.vram_gib)
    best, runner_up = rec.best, rec.runner_up
    return {
        "schema_version": SCHEMA_VERSION,
        "peftpick_version": __version__,
        "request": request_to_dict(rec.request),
        "architecture": architecture_to_dict(rec.architecture),
        "gpu": rec.gpu,
        "assumptions": list(rec.assumptions),
        "verdict": rec.verdict,
        "ranked": [ranked_to_dict(ranked, position, vram_gib, rec) for position, ranked in enumerate(rec.ranked, 1)],
        "excluded": [exclusion_to_dict(exclusion) for exclusion in rec.excluded],
        "goal_weights": json_safe(dict(rec.goal_weights)),
        "uncertainty": list(rec.uncertainty),
        "probes": [{"method": probe.method, **(probe_to_dict(probe) or {})} for probe in rec.probes],
        "lengths": dataclasses.asdict(rec.lengths) if rec.lengths is not None else None,
        "best": best.method if best else None,
        "runner_up": runner_up.method if runner_up else None,
        "peft_snippet": snippet_for(best, rec) if best else None,
        "alternative": alternative_to_dict(rec),
    }
