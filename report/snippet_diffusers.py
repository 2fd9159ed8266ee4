"""Copy-paste Python for a denoiser candidate: diffusers model, PEFT adapter, the training step the plan assumes.

The same four marked sections as the language-model snippet (`report.snippet`): the adapter section runs on its
own with peft installed; the model section loads only the denoiser (text embeddings and latents are assumed
cached beforehand, the low-memory recipe the estimate was made for, unless the request kept the encoders
resident); the training section is one flow-matching (or noise-prediction) step; the last section saves the
adapter in the form the report's serving verdict names.
"""

from __future__ import annotations

from typing import Any

from peftpick.report.formatting import gib, memory_source
from peftpick.report.snippet import ADAPTER_SECTION, MODEL_SECTION, SAVE_SECTION, TRAINING_SECTION, python_literal
from peftpick.types import RankedCandidate, Recommendation

MODEL_PLACEHOLDER = "path/or/hub-id-of-your-model"


def diffusers_snippet(ranked: RankedCandidate, rec: Recommendation) -> str:
    """Python source that sets up `ranked` for `rec`'s denoiser: adapter config, model, one training step, save."""
    arch = rec.architecture
    denoiser = arch.denoiser
    assert denoiser is not None, "diffusers_snippet is the denoiser workload's snippet"
    candidate, plan = ranked.candidate, ranked.plan
    estimate = plan.estimate
    dtype = estimate.shape.dtype
    is_peft = candidate.peft_config_class is not None
    model_id = arch.local_path or arch.hub_id or MODEL_PLACEHOLDER  # a registry name is not a loadable id
    subfolder = "unet" if denoiser.diffusers_class == "UNet2DConditionModel" else "transformer"
    request = rec.request
    resolution = request.resolution or denoiser.default_resolution

    lines = [
        f"# peftpick: {candidate.display_name}, peak {gib(estimate.peak_reserved_bytes)} GiB reserved / "
        f"{gib(estimate.peak_allocated_bytes)} GiB allocated ({memory_source(estimate)})",
        "import torch",
        f"from diffusers import {denoiser.diffusers_class}",
    ]
    if is_peft:
        lines.append(f"from peft import {candidate.peft_config_class}, get_peft_model")
    lines += ["", ADAPTER_SECTION]
    if is_peft:
        lines.append(f"peft_config = {candidate.peft_config_class}(")
        lines += [f"    {key}={python_literal(value)}," for key, value in candidate.peft_kwargs.items()]
        lines.append(")")
    else:
        lines.append("# full fine-tuning: no PEFT config, every weight of the denoiser trains")
    if candidate.benchmark_run:
        lines.append(f"# settings taken from benchmark run {candidate.benchmark_run}")

    lines += [
        "",
        MODEL_SECTION,
        f"MODEL_ID = {python_literal(model_id)}",
        f"model = {denoiser.diffusers_class}.from_pretrained(MODEL_ID, subfolder={python_literal(subfolder)}, "
        f"torch_dtype=torch.{dtype})",
    ]
    if is_peft:
        lines += ["model = get_peft_model(model, peft_config)", "model.print_trainable_parameters()"]
    if plan.gradient_checkpointing:
        lines.append("model.enable_gradient_checkpointing()")
    else:
        lines.append("# gradient checkpointing off: the plan fits without it, and it costs about a third more compute")
    if request.cached_inputs:
        lines.append("# the plan assumes text embeddings and latents computed beforehand, with the text encoders and "
                     "VAE off the GPU while training")
    else:
        lines.append("# the plan keeps the text encoders and VAE on the GPU while training")

    lines += [
        "",
        TRAINING_SECTION,
        f"micro_batch_size = {plan.micro_batch}",
        f"gradient_accumulation_steps = {plan.gradient_accumulation}  # effective batch "
        f"{plan.micro_batch * plan.gradient_accumulation}",
        f"resolution = {resolution}",
        f"learning_rate = {python_literal(float(candidate.learning_rate))}",
        "optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)",
        *_loss_lines(denoiser.objective),
        "",
        SAVE_SECTION,
        *_save_lines(ranked, denoiser, is_peft),
    ]
    return "\n".join(lines) + "\n"


def _loss_lines(objective: str) -> list[str]:
    if objective == "flow":
        return ["# one step: noisy = (1 - sigma) * latents + sigma * noise; prediction = model(noisy, timestep=sigma, "
                "...)",
                "# loss = torch.nn.functional.mse_loss(prediction.float(), (noise - latents).float())  # flow "
                "matching"]
    target = "noise" if objective == "epsilon" else "scheduler.get_velocity(latents, noise, timesteps)"
    return ["# one step: noisy = scheduler.add_noise(latents, noise, timesteps); prediction = model(noisy, "
            "timesteps, ...).sample",
            f"# loss = torch.nn.functional.mse_loss(prediction.float(), ({target}).float())"]


def _save_lines(ranked: RankedCandidate, denoiser: Any, is_peft: bool) -> list[str]:
    if not is_peft:
        return ['model.save_pretrained("fine-tuned-denoiser")  # a whole denoiser: swap it into the pipeline']
    lines = ['model.save_pretrained("adapter")']
    conversion = ranked.serving.conversion
    if conversion == "diffusers":
        lines.append("# then: peftpick convert adapter --format diffusers -o adapter-diffusers  (keys with the "
                     f"transformer. prefix and the LoRA config as metadata, for {denoiser.pipeline_class or 'the pipeline'}"
                     ".load_lora_weights)")
    elif conversion == "kohya":
        lines.append("# then: peftpick convert adapter --format kohya -o adapter.safetensors  (the key format "
                     "ComfyUI, Forge and InvokeAI read, alpha kept)")
    elif conversion == "svd":
        lines.append("# then: peftpick convert adapter --to lora --rank R -o adapter-lora  (approximate; it prints "
                     "the error per layer)")
    elif ranked.serving.route == "merge":
        lines.append("# then: merge it into the denoiser (PEFT merge_and_unload) and use the merged checkpoint")
    return lines
