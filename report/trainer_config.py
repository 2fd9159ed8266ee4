"""The chosen plan as the user's own trainer takes it: transformers' TrainingArguments, TRL's SFTConfig, and a
runnable TRL training script (`peftpick ... --emit train.py`).

The configs are built by the libraries' own classes from the plan's figures (micro-batch, accumulation,
checkpointing, learning rate, precision, optimizer, loss kernel); anything the caller passes overrides them.
"""

from __future__ import annotations

import functools
from typing import Any

from peftpick.errors import PeftpickError
from peftpick.types import RankedCandidate, Recommendation

# peftpick's optimizer names -> transformers' OptimizerNames (training_args.py). LoRA-FA has no name there: the
# trainer gets PEFT's create_lorafa_optimizer through `optimizers=` (trainer_optimizers below), and `optim` is left out.
TRAINER_OPTIMIZERS = {"adamw": "adamw_torch", "adamw-8bit": "adamw_bnb_8bit", "paged-adamw-8bit": "paged_adamw_8bit",
                      "adafactor": "adafactor", "sgd": "sgd"}
LORA_FA = "lora-fa"


def checkpointing_argument() -> str:
    """The TrainingArguments field that turns on checkpointing in the installed transformers:
    `activation_checkpointing` where it exists (5.24.0 has it, with `gradient_checkpointing` as a deprecated alias
    that warns), else `gradient_checkpointing`. Read from the source, so that a report imports no transformers."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("transformers")
    source = Path(spec.origin).with_name("training_args.py") if spec and spec.origin else None
    try:
        return _checkpointing_field(str(source), source.stat().st_mtime_ns) if source else "gradient_checkpointing"
    except OSError:
        return "gradient_checkpointing"


@functools.lru_cache(maxsize=4)
def _checkpointing_field(path: str, _modified_ns: int) -> str:
    """The field `path` (training_args.py, ~100 KB) declares; kept per file and modification time, since every
    rendered snippet asks."""
    from pathlib import Path

    text = Path(path).read_text(encoding="utf-8")
    return "activation_checkpointing" if "\n    activation_checkpointing:" in text else "gradient_checkpointing"


def model_checkpointing(plan) -> bool:
    """Whether the model itself recomputes its layers: the plan's checkpointing, except under FSDP, whose config
    turns on FSDP's own activation checkpointing (report/launch.py): transformers warns that also checkpointing
    in the model adds a redundant all-gather in backward (training_args.py, transformers 5.24.0)."""
    return plan.gradient_checkpointing and not str(plan.strategy).startswith("fsdp")


def plan_arguments(ranked: RankedCandidate, for_trl: bool = False) -> dict[str, Any]:
    """TrainingArguments / SFTConfig keyword arguments that carry the plan."""
    plan, candidate, shape = ranked.plan, ranked.candidate, ranked.plan.estimate.shape
    checkpointing = checkpointing_argument()
    arguments: dict[str, Any] = {
        "per_device_train_batch_size": plan.micro_batch,
        "gradient_accumulation_steps": plan.gradient_accumulation,
        checkpointing: model_checkpointing(plan),
        "learning_rate": candidate.learning_rate,
        "bf16": shape.dtype == "bfloat16",
        "fp16": shape.dtype == "float16",
    }
    if plan.optimizer != LORA_FA:
        arguments["optim"] = TRAINER_OPTIMIZERS.get(plan.optimizer, "adamw_torch")
    if plan.optimizer == "sgd":  # the Trainer's "sgd" has no momentum; the estimate's and the probes' has 0.9
        arguments["optim_args"] = "momentum=0.9"
    if model_checkpointing(plan):
        arguments[f"{checkpointing}_kwargs"] = {"use_reentrant": False}
    if for_trl:
        arguments["max_length"] = shape.seq_len
    elif plan.loss == "liger":
        arguments["use_liger_kernel"] = True  # Trainer.train applies liger's patch for the model type
    return arguments


def training_arguments(ranked: RankedCandidate, output_dir: str, **overrides: Any):
    """A transformers.TrainingArguments with the plan's settings (`overrides` win). For LoRA-FA, pass
    `optimizers=trainer_optimizers(ranked, peft_model)` to the Trainer too: its optimizer is not a TrainingArguments
    name, and without it the Trainer trains LoRA-FA's frozen A matrices with plain AdamW."""
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=output_dir, **{**plan_arguments(ranked), **overrides})


def sft_config(ranked: RankedCandidate, output_dir: str, **overrides: Any):
    """A trl.SFTConfig with the plan's settings (`overrides` win). TRL computes the loss with its own chunked
    LM head, so a plan made with Liger's loss is not passed on (TRL refuses Liger's fused cross-entropy). For LoRA-FA,
    give SFTTrainer the PEFT model and `optimizers=trainer_optimizers(ranked, peft_model)`, as training_arguments says."""
    try:
        from trl import SFTConfig
    except ImportError:
        raise PeftpickError("sft_config() needs TRL", "pip install 'peftpick[train]' (or pip install trl)") from None
    return SFTConfig(output_dir=output_dir, **{**plan_arguments(ranked, for_trl=True), **overrides})


def trainer_optimizers(ranked: RankedCandidate, model) -> tuple[Any, None]:
    """The Trainer's `optimizers=` pair for this plan on `model` (the PeftModel): LoRA-FA's optimizer, built by
    PEFT's create_lorafa_optimizer with the candidate's rank, alpha and learning rate; (None, None) otherwise (the
    Trainer builds the optimizer TrainingArguments names)."""
    candidate = ranked.candidate
    if candidate.optimizer != LORA_FA:
        return None, None
    from peft.optimizers import create_lorafa_optimizer

    kwargs = candidate.peft_kwargs
    optimizer = create_lorafa_optimizer(model=model, r=kwargs.get("r", 8), lora_alpha=kwargs.get("lora_alpha", 8),
                                        lr=candidate.learning_rate, use_rslora=bool(kwargs.get("use_rslora")))
    return optimizer, None


def training_script(rec: Recommendation, ranked: RankedCandidate | None = None) -> str:
    """A runnable TRL script that trains `ranked` (default: the best) with its plan on a JSON-lines or text
    dataset: `python train.py --data data.jsonl [--model PATH] [--output-dir DIR] [--max-steps N] [--cpu]`."""
    ranked = ranked or rec.best
    if ranked is None:
        raise PeftpickError("no candidate to write a training script for: nothing fits",
                            "see the exclusions in the report; change --vram, --seq-len or --quant first")
    if ranked.candidate.peft_config_class is None:
        raise PeftpickError("--emit writes adapter training scripts, and the chosen plan is full fine-tuning",
                            "pass --methods with an adapter method (e.g. lora) to emit a script")
    config = ranked.peft_config()
    config_repr = _config_call(config)
    lora_fa = ranked.candidate.optimizer == LORA_FA
    arguments = plan_arguments(ranked, for_trl=True)
    quant = rec.request.quant.value
    # a bundled name is not something from_pretrained can load: its hub id is
    model_id = rec.architecture.hub_id or rec.request.model
    lines = [
        '"""Train ' + f"{ranked.candidate.display_name} on {rec.architecture.name}" + ' with TRL, as peftpick planned it.',
        "",
        f"Plan: micro-batch {ranked.plan.micro_batch} x {ranked.plan.gradient_accumulation} accumulation, gradient "
        f"checkpointing {'on' if ranked.plan.gradient_checkpointing else 'off'}, peak "
        f"{ranked.estimate.peak_reserved_bytes / 2**30:.1f} GiB reserved ({ranked.estimate.source or 'estimated'}) "
        f"on a {rec.request.vram_gib:g} GiB GPU, estimated for {_LOOP_WORDS[rec.request.trainer.value]}"
        + ("" if rec.request.trainer.value == "trl" else " (`peftpick ... --trainer trl` estimates this script's loop)")
        + ".",
        "Run: python train.py --data data.jsonl   (one JSON object per line with a \"text\" or \"messages\" field)",
        '"""',
        "",
        "import argparse",
        "",
        "import torch",
        "from datasets import load_dataset",
        "from peft import " + ", ".join([type(config).__name__] + (["get_peft_model"] if lora_fa else [])),
        *(["from peft.optimizers import create_lorafa_optimizer"] if lora_fa else []),
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "from trl import SFTConfig, SFTTrainer",
        "",
        "parser = argparse.ArgumentParser()",
        f"parser.add_argument(\"--model\", default={model_id!r})",
        "parser.add_argument(\"--data\", required=True, help=\"a .jsonl/.json file (text or messages) or a .txt file\")",
        "parser.add_argument(\"--output-dir\", default=\"adapter\")",
        "parser.add_argument(\"--max-steps\", type=int, default=-1)",
        "parser.add_argument(\"--epochs\", type=float, default=1.0)",
        "parser.add_argument(\"--cpu\", action=\"store_true\", help=\"train on the CPU in float32 (a smoke test)\")",
        "args = parser.parse_args()",
        "",
        "dtype = torch.float32 if args.cpu else " + f"torch.{ranked.estimate.shape.dtype}",
        "model_kwargs = {\"dtype\": dtype}",
    ]
    if quant != "none":
        lines += [
            "if not args.cpu:  # bitsandbytes' quantized base, as the estimate assumed",
            "    from transformers import BitsAndBytesConfig",
            "",
            "    model_kwargs[\"quantization_config\"] = BitsAndBytesConfig(" + _quant_config(quant, ranked) + ")",
        ]
    lines += [
        "model = AutoModelForCausalLM.from_pretrained(args.model, **model_kwargs)",
        "tokenizer = AutoTokenizer.from_pretrained(args.model)",
        "kind = \"text\" if args.data.endswith(\".txt\") else \"json\"",
        "dataset = load_dataset(kind, data_files=args.data, split=\"train\")",
        "",
        f"peft_config = {config_repr}",
        "training_args = SFTConfig(",
        "    output_dir=args.output_dir,",
        "    max_steps=args.max_steps,",
        "    num_train_epochs=args.epochs,",
        *[f"    {key}={value!r}," for key, value in arguments.items() if key not in ("bf16", "fp16")],
        "    bf16=" + ("not args.cpu" if arguments["bf16"] else "False") + ",",
        "    fp16=" + ("not args.cpu" if arguments["fp16"] else "False") + ",",
        "    use_cpu=args.cpu,",
        "    logging_steps=1,",
        "    save_strategy=\"no\",",
        "    report_to=\"none\",",
        ")",
        *(_lora_fa_lines(ranked, quant) if lora_fa else [
            "trainer = SFTTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,",
            "                     peft_config=peft_config)"]),
        "trainer.train()",
        "trainer.save_model(args.output_dir)  # the adapter (adapter_config.json + adapter_model.safetensors)",
        "",
    ]
    return "\n".join(lines)


def _lora_fa_lines(ranked: RankedCandidate, quant: str) -> list[str]:
    """LoRA-FA in the script: the PEFT model is made here, so that its optimizer can be built on it and handed to
    the trainer (TRL's peft_config path would build a plain AdamW over the frozen A matrices too)."""
    kwargs = ranked.candidate.peft_kwargs
    rslora = ", use_rslora=True" if kwargs.get("use_rslora") else ""
    lines = []
    if quant != "none":
        lines += ["if not args.cpu:  # what SFTTrainer does for a quantized base when it makes the PEFT model",
                  "    from peft import prepare_model_for_kbit_training",
                  "",
                  "    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing="
                  f"training_args.{checkpointing_argument()})"]
    return lines + [
        "model = get_peft_model(model, peft_config)",
        f"optimizer = create_lorafa_optimizer(model=model, r={kwargs.get('r', 8)!r}, lora_alpha="
        f"{kwargs.get('lora_alpha', 8)!r}, lr=training_args.learning_rate{rslora})",
        "trainer = SFTTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,",
        "                     optimizers=(optimizer, None))",
    ]


_LOOP_WORDS = {"plain": "a plain training loop", "hf": "transformers' Trainer", "trl": "TRL's SFTTrainer"}


def _config_call(config) -> str:
    """The PEFT config as a constructor call with the settings that differ from the class's defaults."""
    import dataclasses

    defaults = type(config)()
    fields = []
    for field in dataclasses.fields(config):
        if not field.init or field.name in ("peft_type", "base_model_name_or_path", "revision", "task_type"):
            continue
        value = getattr(config, field.name)
        if value != getattr(defaults, field.name):
            fields.append(f"{field.name}={_literal(value)}")
    fields.append('task_type="CAUSAL_LM"')
    return f"{type(config).__name__}(" + ", ".join(fields) + ")"


def _literal(value: Any) -> str:
    if isinstance(value, (set, frozenset)):
        return repr(sorted(value))
    return repr(value.value if hasattr(value, "value") and not isinstance(value, (str, int, float)) else value)


def _quant_config(quant: str, ranked: RankedCandidate) -> str:
    if quant == "8bit":
        return "load_in_8bit=True"
    return (f"load_in_4bit=True, bnb_4bit_quant_type=\"nf4\", bnb_4bit_use_double_quant={quant == '4bit'}, "
            f"bnb_4bit_compute_dtype=torch.{ranked.estimate.shape.dtype}")
