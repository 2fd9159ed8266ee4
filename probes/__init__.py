"""Probes: a short micro-training of candidate methods on the user's own GPU, model and data, measuring peak
memory (torch and NVML), speed and the loss slope.

    import peftpick
    results = peftpick.probe("./my-model", ["lora", "dora"], data="train.jsonl", steps=10)

`probe` builds the candidates itself; the recommender calls `run_probes` with the shortlist it already built and
the settings it planned. What a probe trains depends on the model's workload (`job.probe_program`): a causal LM
trains on text, a diffusion denoiser (`diffusion`) on random latents and text embeddings of the training shapes.
Each candidate runs in its own worker process (see `runner` and `worker`); results are cached on disk (`cache`); `probe_to_estimate` turns a result into the `MemoryEstimate` the report shows,
labelled "measured on <GPU>". On a machine without a GPU probes run on the CPU (small models only) and measure
speed and the loss slope, not memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from peftpick.errors import PeftpickError
from peftpick.probes.cache import ProbeWarning
from peftpick.probes.device import GpuInfo, detect_gpu
from peftpick.probes.job import ProbeProgram, probe_program
from peftpick.probes.results import (
    StackMismatch,
    fit_loss_slope,
    probe_stack,
    probe_to_estimate,
    result_from_dict,
    result_to_dict,
    stack_mismatch,
)
from peftpick.probes.runner import (
    DEFAULT_TIMEOUT_S,
    ProbeOptions,
    ProbesInterrupted,
    cheaper_settings,
    run_probes,
)
from peftpick.types import Architecture, ProbeResult, TrainingShape

# What `peftpick probe` measures without --methods: methods whose memory and learning differ (LoRA and its
# re-parametrisations rsLoRA / PiSSA / OLoRA share LoRA's memory), eight as in the recommender's shortlist.
# A denoiser's are its program's `default_methods` (the image suite's methods).
DEFAULT_METHODS = ("lora", "dora", "lora-fa", "oft", "ia3", "loha", "vera", "prompt-tuning")


def probe(
    model: Any,
    methods: Iterable[str] | str | None = None,
    data: str | Path | None = None,
    *,
    seq_len: int = 768,
    batch_size: int = 4,
    steps: int = 10,
    gradient_checkpointing: bool = False,
    random_weights: bool = False,
    device: str | None = None,
    cache: bool = True,
    progress: Any = None,
    text_field: str | None = None,
    prompt_field: str | None = None,
    response_field: str | None = None,
    timeout_s: float | None = None,
    learning_rate: float | None = None,
    resolution: int | None = None,
    frames: int | None = None,
    gpus: int = 1,
    optimizer: str | None = None,
    quant: str = "none",
    loss: str = "stock",
    trainer: str = "plain",
) -> list[ProbeResult]:
    """Micro-train each of `methods` on `model` and return what was measured, one result per method in order.

    model: a bundled name, a local folder (weights loaded from it), a hub id or an Architecture; a bundled name
        needs the weights in the local Hugging Face cache unless `random_weights` (memory and speed only).
    methods: catalogue keys (a list or "a,b,c"); None: DEFAULT_METHODS (a denoiser: the image suite's eight). A
        method that cannot be applied to the model gives a result with status "error" saying why.
    data: JSON lines / JSON / CSV / TSV / Parquet / text with a `text` field or prompt/response fields (names
        overridable); None: the built-in arithmetic sample. Denoisers take none (random latents and text
        embeddings).
    resolution, frames: a diffusion denoiser's training images (pixels per side) and video frames per clip;
        None: the model's usual. seq_len is unused for denoisers.
    steps: measured optimizer steps (at least 2) after one warm-up step.
    device: "cuda", "cuda:N" or "cpu"; None: the GPU when there is one.
    cache: read and write the probe cache ($PEFTPICK_CACHE_DIR or ~/.cache/peftpick/probes.sqlite).
    progress: True for a progress bar on stderr, a callable for one-line messages, False for none; None: a bar
        when stderr is a terminal.
    learning_rate: None uses each method's benchmark learning rate.
    gpus: run each probe under torchrun with FSDP2 on this many GPUs (on the CPU: gloo processes); the peaks are
        the busiest rank's, `ProbeResult.ranks` has each rank's (probes.torchrun).
    optimizer / quant / loss / trainer: the training stack each probe runs, as the estimator names it
        (probes.stack): optimizer None is each method's own (AdamW, LoRA-FA's); quant "4bit" / "4bit-no-dq" /
        "8bit" quantizes the base with bitsandbytes; loss "liger" / "chunked"; trainer "hf" (transformers'
        Trainer) / "trl" (TRL's SFTTrainer). The result's `shape` and its "stack: ..." note say what ran.
    Raises PeftpickError for bad input, ProbesInterrupted (with the finished results) on Ctrl-C.
    """
    from peftpick.knowledge.architectures import resolve_model
    from peftpick.methods import ArchitectureNotSupported, build_candidate, get_method

    options = ProbeOptions(steps=steps, batch_size=batch_size, seq_len=seq_len,
                           gradient_checkpointing=gradient_checkpointing, random_weights=random_weights,
                           device=device, cache=cache, timeout_s=timeout_s, data=data, text_field=text_field,
                           prompt_field=prompt_field, response_field=response_field, learning_rate=learning_rate,
                           resolution=resolution, frames=frames, gpus=gpus, optimizer=optimizer, quant=quant,
                           loss=loss, trainer=trainer)
    arch = model if isinstance(model, Architecture) else resolve_model(model)
    names = _method_names(methods, probe_program(arch.workload).default_methods)
    # unknown names fail here, before any work
    specs = list(dict.fromkeys(get_method(name, arch.workload) for name in names))
    candidates = []
    not_applicable: dict[int, ProbeResult] = {}
    for position, spec in enumerate(specs):
        try:
            candidates.append(build_candidate(spec, arch))
        except ArchitectureNotSupported as error:
            not_applicable[position] = ProbeResult(
                method=spec.key, status="error", device="not run", display_name=spec.display_name,
                shape=TrainingShape(batch_size=batch_size, seq_len=seq_len, resolution=resolution, frames=frames,
                                    optimizer=optimizer or "adamw", quant=quant, loss=loss, trainer=trainer),
                error=f"not applicable: {error}")
    measured = iter(run_probes(arch, candidates, None, options, progress=progress) if candidates else [])
    return [not_applicable[position] if position in not_applicable else next(measured)
            for position in range(len(specs))]


def _method_names(methods: Iterable[str] | str | None, defaults: Iterable[str] = DEFAULT_METHODS) -> list[str]:
    if methods is None:
        return list(defaults)
    if isinstance(methods, str):
        methods = methods.split(",")
    names = [str(name).strip() for name in methods if str(name).strip()]
    if not names:
        raise PeftpickError("no method to probe", "pass method names, e.g. lora,dora (see `peftpick probe --help`)")
    return names


__all__ = [
    "DEFAULT_METHODS",
    "DEFAULT_TIMEOUT_S",
    "GpuInfo",
    "ProbeOptions",
    "ProbeProgram",
    "ProbeWarning",
    "ProbesInterrupted",
    "StackMismatch",
    "cheaper_settings",
    "detect_gpu",
    "fit_loss_slope",
    "probe",
    "probe_program",
    "probe_stack",
    "probe_to_estimate",
    "result_from_dict",
    "result_to_dict",
    "run_probes",
    "stack_mismatch",
]
