"""Copy-paste Python that sets up the recommended candidate: PEFT config, model, optimizer, batch settings.

The snippet is plain Python with four marked sections (`# --- adapter ---`, `# --- model ---`,
`# --- training ---`, `# --- after training ---`: how to save the result so that the report's serving route
applies); the adapter section runs on its own with peft installed, the rest needs the model.
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Mapping
from enum import Enum
from typing import Any

from peftpick.report.formatting import gib, memory_source, optimizer_label
from peftpick.report.trainer_config import checkpointing_argument, model_checkpointing
from peftpick.types import Quant, RankedCandidate, Recommendation

ADAPTER_SECTION = "# --- adapter ---"
MODEL_SECTION = "# --- model ---"
TRAINING_SECTION = "# --- training ---"
SAVE_SECTION = "# --- after training ---"
MODEL_PLACEHOLDER = "path/or/hub-id-of-your-model"
_TASK_TYPE = "CAUSAL_LM"


def python_literal(value: Any) -> str:
    """Source text that evaluates to `value` (sets become sorted lists, enums their value)."""
    if isinstance(value, Enum):
        return python_literal(value.value)
    if isinstance(value, str):
        return json.dumps(value)  # a valid Python literal too, in the double quotes code style prefers
    if value is None or isinstance(value, (bool, int)):
        return repr(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else f'float("{value}")'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(python_literal(item) for item in value) + "]"
    if isinstance(value, (set, frozenset)):
        return "[" + ", ".join(python_literal(item) for item in sorted(value, key=str)) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{python_literal(str(k))}: {python_literal(v)}" for k, v in value.items()) + "}"
    text = repr(value)
    try:
        ast.literal_eval(text)
    except (ValueError, SyntaxError):
        # Something only the live object can represent; its text keeps the snippet valid and readable.
        return repr(str(value))
    return text


def _config_call(class_name: str, kwargs: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> list[str]:
    """The config's constructor call with the settings that differ from the class's own defaults (`defaults`: the
    candidate's, read with it; None: from the installed PEFT)."""
    lines = [f"peft_config = {class_name}(", f"    task_type={python_literal(_TASK_TYPE)},"]
    defaults = _defaults(class_name) if defaults is None else defaults
    lines += [f"    {key}={python_literal(value)}," for key, value in kwargs.items()
              if key != "task_type" and not (key in defaults and _same(defaults[key], value))]
    lines.append(")")
    return lines


def _defaults(class_name: str) -> dict[str, Any]:
    import dataclasses

    import peft

    cls = getattr(peft, class_name, None)
    if cls is None or not dataclasses.is_dataclass(cls):
        return {}
    instance = cls()
    return {f.name: getattr(instance, f.name) for f in dataclasses.fields(cls) if f.init}


def _same(default: Any, value: Any) -> bool:
    if isinstance(default, (set, frozenset)) or isinstance(value, (set, frozenset)):
        return set(default or ()) == set(value or ())
    return type(default) is type(value) and default == value


def _quant_value(quant: Quant | str) -> str:
    return quant.value if isinstance(quant, Quant) else str(quant or "none")


def _model_lines(model_id: str, dtype: str, quant: str, checkpointing: bool | None) -> tuple[list[str], list[str]]:
    """(imports, model section lines) loading the base model, quantized when asked, with checkpointing set.

    checkpointing None: left to prepare_model_for_kbit_training, which the caller adds.
    """
    lines = [f"MODEL_ID = {python_literal(model_id)}"]
    if quant in ("4bit", "4bit-no-dq", "8bit"):
        imports = ["from transformers import AutoModelForCausalLM, BitsAndBytesConfig"]
        if quant != "8bit":
            lines += [
                "quantization_config = BitsAndBytesConfig(",
                "    load_in_4bit=True,",
                '    bnb_4bit_quant_type="nf4",',
                f"    bnb_4bit_compute_dtype=torch.{dtype},",
                f"    bnb_4bit_use_double_quant={quant == '4bit'},",
                ")",
            ]
        else:
            lines.append("quantization_config = BitsAndBytesConfig(load_in_8bit=True)")
        lines.append(
            f"model = AutoModelForCausalLM.from_pretrained(MODEL_ID, dtype=torch.{dtype}, "
            "quantization_config=quantization_config)"
        )
    else:
        imports = ["from transformers import AutoModelForCausalLM"]
        lines.append(f"model = AutoModelForCausalLM.from_pretrained(MODEL_ID, dtype=torch.{dtype})")
    if checkpointing:
        # Non-reentrant checkpointing needs no input-gradient hooks with frozen embeddings.
        lines.append('model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})')
    elif checkpointing is not None:
        lines.append("# gradient checkpointing off: the plan fits without it, and it costs about a third more compute")
    return imports, lines


def snippet_for(ranked: RankedCandidate, rec: Recommendation) -> str:
    """The copy-paste code for a ranked candidate of `rec`, as the model's workload writes it."""
    from peftpick.workloads import workload_of

    return workload_of(rec.architecture).hook("snippet")(ranked, rec)


def model_id_of(rec: Recommendation) -> str:
    """What from_pretrained should load for this request: the local folder, the hub id, or the name typed."""
    arch = rec.architecture
    return arch.local_path or arch.hub_id or rec.request.model


def lm_snippet(ranked: RankedCandidate, rec: Recommendation) -> str:
    """The causal-LM workload's snippet for `rec` (its model id and quantization)."""
    return peft_snippet(ranked, model_id_of(rec), rec.request.quant)


def peft_snippet(ranked: RankedCandidate, model_id: str | None = None, quant: Quant | str = "none") -> str:
    """Python source that builds `ranked`'s PEFT config, loads the model and sets up its training.

    model_id: what `from_pretrained` should load (hub id or local folder); a placeholder when None.
    quant: "4bit" / "8bit" load the frozen base through bitsandbytes and prepare it for k-bit training.
    """
    candidate, plan = ranked.candidate, ranked.plan
    estimate = plan.estimate
    dtype = estimate.shape.dtype
    quant = _quant_value(quant)
    is_peft = candidate.peft_config_class is not None
    lora_fa = candidate.optimizer == "lora-fa"
    # Quantized frozen base weights (QLoRA-style): PEFT prepares the model and sets up checkpointing.
    kbit = is_peft and quant in ("4bit", "4bit-no-dq", "8bit")

    peft_names = [candidate.peft_config_class, "get_peft_model"] if is_peft else []
    if kbit:
        peft_names.append("prepare_model_for_kbit_training")
    # Quantized weights cannot be trained, so full fine-tuning always loads the model unquantized.
    sharded_checkpointing = plan.gradient_checkpointing and not model_checkpointing(plan)
    model_imports, model_lines = _model_lines(
        model_id or MODEL_PLACEHOLDER, dtype, quant if is_peft else "none",
        None if kbit or sharded_checkpointing else plan.gradient_checkpointing
    )
    if sharded_checkpointing:
        model_lines.append("# gradient checkpointing: FSDP's activation checkpointing, set in the accelerate config "
                           "(not in the model too: that adds an all-gather in backward)")
    imports = ["import torch"]
    if peft_names:
        imports.append(f"from peft import {', '.join(sorted(peft_names))}")
    if lora_fa:
        imports.append("from peft.optimizers import create_lorafa_optimizer")
    else:
        imports += _OPTIMIZER_LINES[plan.optimizer][1]
    imports += model_imports

    effective = plan.micro_batch * plan.gradient_accumulation * plan.gpus  # several GPUs each take a micro-batch
    lines = [
        f"# peftpick: {candidate.display_name}, peak {gib(estimate.peak_reserved_bytes)} GiB reserved / "
        f"{gib(estimate.peak_allocated_bytes)} GiB allocated ({memory_source(estimate)})",
        *imports,
        "",
        ADAPTER_SECTION,
    ]
    if is_peft:
        lines += _config_call(candidate.peft_config_class, candidate.peft_kwargs, candidate.peft_defaults or None)
    else:
        lines.append("# full fine-tuning: no PEFT config, every weight of the model trains")
    if candidate.benchmark_run:
        lines.append(f"# settings taken from benchmark run {candidate.benchmark_run}")

    lines += ["", MODEL_SECTION, *model_lines]
    if is_peft:
        if kbit:
            kwargs = ", gradient_checkpointing_kwargs={\"use_reentrant\": False}" if plan.gradient_checkpointing else ""
            lines.append(
                f"model = prepare_model_for_kbit_training(model, use_gradient_checkpointing="
                f"{plan.gradient_checkpointing}{kwargs})"
            )
        lines += ["model = get_peft_model(model, peft_config)", "model.print_trainable_parameters()"]
        if ranked.serving.conversion == "initial-model":
            init = candidate.peft_kwargs.get("init_lora_weights")
            lines += [
                f"# {candidate.display_name} rewrites the base weights: keep the adapter as initialised, so that the trained",
                "# one can be saved as a plain LoRA adapter for the original base (see the end)",
                'model.peft_config["default"].init_lora_weights = True',
                'model.save_pretrained("adapter-init")',
                f'model.peft_config["default"].init_lora_weights = {python_literal(init)}',
            ]

    lines += [
        "",
        TRAINING_SECTION,
        f"micro_batch_size = {plan.micro_batch}",
        f"gradient_accumulation_steps = {plan.gradient_accumulation}  # effective batch {effective}"
        + (f" (per GPU, on {plan.gpus} GPUs with {plan.strategy}: launch as the report shows)" if plan.gpus > 1 else ""),
        f"learning_rate = {python_literal(float(candidate.learning_rate))}",
    ]
    if lora_fa:
        kwargs = candidate.peft_kwargs
        rslora = ", use_rslora=True" if kwargs.get("use_rslora") else ""
        lines.append(
            f"optimizer = create_lorafa_optimizer(model=model, r={python_literal(kwargs.get('r', 8))}, "
            f"lora_alpha={python_literal(kwargs.get('lora_alpha', 8))}, lr=learning_rate{rslora})"
        )
    else:
        constructor = _OPTIMIZER_LINES[plan.optimizer][0]
        lines.append(f"optimizer = {constructor}([p for p in model.parameters() if p.requires_grad], "
                     f"lr=learning_rate{_OPTIMIZER_KWARGS.get(plan.optimizer, '')})")
    precision = {"bfloat16": "bf16=True", "float16": "fp16=True"}.get(dtype, "")
    trainer_args = [
        "per_device_train_batch_size=micro_batch_size",
        "gradient_accumulation_steps=gradient_accumulation_steps",
        f"{checkpointing_argument()}={model_checkpointing(plan)}",
        "learning_rate=learning_rate",
        *([precision] if precision else []),
        *(["use_liger_kernel=True  # pip install liger-kernel"] if plan.loss == "liger" else []),
    ]
    lines += [
        f"# optimizer: {optimizer_label(plan.optimizer)}. With transformers' Trainer, pass "
        "optimizers=(optimizer, None) and",
        "# TrainingArguments(",
        *(f"#     {argument}," for argument in trainer_args),
        "# )",
    ]
    lines += ["", SAVE_SECTION, *_save_lines(ranked)]
    return "\n".join(lines) + "\n"


# How the snippet builds each optimizer the estimate traced (estimator.optimizers, same settings)
_OPTIMIZER_LINES = {
    "adamw": ("torch.optim.AdamW", []),
    "adamw-8bit": ("bitsandbytes.optim.AdamW8bit", ["import bitsandbytes  # pip install bitsandbytes; CUDA"]),
    "paged-adamw-8bit": ("bitsandbytes.optim.PagedAdamW8bit", ["import bitsandbytes  # pip install bitsandbytes; CUDA"]),
    "adafactor": ("Adafactor", ["from transformers.optimization import Adafactor"]),
    "sgd": ("torch.optim.SGD", []),
}
_OPTIMIZER_KWARGS = {"adafactor": ", scale_parameter=False, relative_step=False, warmup_init=False",
                     "sgd": ", momentum=0.9"}


def _save_lines(ranked: RankedCandidate) -> list[str]:
    """How to save the trained result so that the serving route of the report applies."""
    serving, candidate = ranked.serving, ranked.candidate
    if candidate.peft_config_class is None:
        return ['model.save_pretrained("fine-tuned-model")  # a whole model: serve the folder as it is']
    if serving.conversion == "initial-model":
        return [f"# a plain LoRA adapter of rank {serving.rank_after} on the original base (PEFT subtracts the initial "
                "adapter; exact)",
                'model.save_pretrained("adapter", path_initial_model_for_weight_conversion="adapter-init")']
    lines = ['model.save_pretrained("adapter")']
    if serving.conversion == "rescale":
        lines.append("# then, for this stack: peftpick convert adapter --to lora -o adapter-lora  (exact: the scale "
                     "baked into lora_B)")
    elif serving.conversion == "svd":
        lines.append("# then, for this stack: peftpick convert adapter --to lora --rank R --base MODEL -o "
                     "adapter-lora  (approximate; it prints the error per layer)")
    elif serving.route == "merge":
        lines.append("# then, for this stack: peftpick merge adapter --base MODEL -o merged-model  (PEFT "
                     "merge_and_unload; serve the merged folder)")
    return lines
