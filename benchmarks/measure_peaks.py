"""Measure the real peak GPU memory of short training runs (needs a CUDA GPU).

    python benchmarks/measure_peaks.py                       # the default grid below, ~15 min on an H100
    python benchmarks/measure_peaks.py --archs phi-3-mini-4k --methods lora-qv-r32,full --out my.jsonl

Every run uses the plain training loop the estimator models (estimator/training.py), in its own subprocess so an
out-of-memory run cannot disturb the next: build the model from its config on the GPU with random weights (memory
does not depend on the values), wrap it with PEFT, then three steps of

    out = model(input_ids=x, labels=x); out.loss.backward(); clip_grad_norm_(trainable, 1.0)
    optimizer.step(); optimizer.zero_grad(set_to_none=True)

and record torch.cuda.max_memory_allocated / max_memory_reserved over the whole run (peak statistics reset and
cache emptied before the model is built), with the GPU name and library versions, one JSON line per run, in the
same fields as ../shared/gpu-measurements/h100-training-peaks.jsonl. Compare with the estimator with
`python benchmarks/compare_estimates.py`, which reads benchmarks/results/*peaks*.jsonl too.

Training stacks (`--stacks`, default `plain`; `--levers` measures every lever below on a smaller grid):

    python benchmarks/measure_peaks.py --levers             # QLoRA bases, 8-bit optimizers, Liger, Trainer, SFTTrainer

    plain             the loop above, bf16 base, torch AdamW
    nf4, nf4-no-dq    a bitsandbytes 4-bit base (double quantization on / off) loaded with from_pretrained(
                      quantization_config=...) from a saved copy, prepared with prepare_model_for_kbit_training
    int8              the same with LLM.int8
    adamw-8bit, paged-adamw-8bit   bitsandbytes' AdamW8bit / PagedAdamW8bit
    liger             Liger's kernels applied to the model (its fused linear cross-entropy among them)
    hf                transformers' Trainer (optim adamw_torch, as the estimate assumes)
    trl, nf4-trl      TRL's SFTTrainer (its chunked LM head), bf16 / 4-bit base

Each row records its stack's quant / optimizer / loss / trainer, which compare_estimates.py passes to the
estimate. Peaks are reset after the model is built for every stack (a quantized base is loaded first).
`--device cpu` runs the same code on the CPU without memory figures (a dry run: tests/test_measure_peaks.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHS = ["llama-3.2-1b", "qwen2.5-1.5b", "gemma-2-2b", "phi-3-mini-4k", "smollm2-1.7b", "mistral-7b-v0.3"]
METHODS = ["full", "lora-qv-r32", "lora-all-r16", "rslora-qv-r64", "dora-qv-r32", "lorafa-qv-r32", "oft-qv-r32",
           "ia3", "prompt-200"]
SHAPES = [(4, 768, False), (1, 2048, False), (8, 1024, True)]
# stack -> (quant, optimizer, loss, trainer), the values peftpick.estimate takes
STACKS = {
    "plain": ("none", "adamw", "stock", "plain"),
    "nf4": ("4bit", "adamw", "stock", "plain"),
    "nf4-no-dq": ("4bit-no-dq", "adamw", "stock", "plain"),
    "int8": ("8bit", "adamw", "stock", "plain"),
    "adamw-8bit": ("none", "adamw-8bit", "stock", "plain"),
    "paged-adamw-8bit": ("none", "paged-adamw-8bit", "stock", "plain"),
    "liger": ("none", "adamw", "liger", "plain"),
    "hf": ("none", "adamw", "stock", "hf"),
    "trl": ("none", "adamw", "chunked", "trl"),
    "nf4-trl": ("4bit", "adamw", "chunked", "trl"),
}
LEVER_ARCHS = ["llama-3.2-1b", "qwen2.5-1.5b", "mistral-7b-v0.3"]
LEVER_METHODS = ["lora-qv-r32"]
LEVER_SHAPES = [(4, 768, False), (4, 768, True)]


def peft_config(method: str, arch):
    """The PEFT config of a measured method, with its targets resolved for the architecture (Phi-3's fused
    qkv_proj for "q and v", GPT-2's c_attn ...)."""
    from peft import IA3Config, LoraConfig, OFTConfig, PromptTuningConfig

    from peftpick.knowledge.targets import peft_default_targets, resolve_targets

    def targets(roles):
        return resolve_targets(arch, roles).modules

    if method == "full":
        return None
    if method in ("lora-qv-r32", "lorafa-qv-r32"):
        return LoraConfig(r=32, lora_alpha=64, target_modules=targets(["q", "v"]), task_type="CAUSAL_LM")
    if method == "lora-all-r16":
        return LoraConfig(r=16, lora_alpha=32, target_modules=targets("all-linear"), task_type="CAUSAL_LM")
    if method == "rslora-qv-r64":
        return LoraConfig(r=64, lora_alpha=64, use_rslora=True, target_modules=targets(["q", "v"]), task_type="CAUSAL_LM")
    if method == "dora-qv-r32":
        return LoraConfig(r=32, lora_alpha=64, use_dora=True, target_modules=targets(["q", "v"]), task_type="CAUSAL_LM")
    if method == "oft-qv-r32":
        return OFTConfig(r=32, oft_block_size=0, target_modules=targets(["q", "v"]), task_type="CAUSAL_LM")
    if method == "ia3":  # PEFT's own IA3 targets where it has them (k, v, down_proj for Llama)
        if peft_default_targets(arch, "IA3"):
            return IA3Config(task_type="CAUSAL_LM")
        return IA3Config(target_modules=targets(["k", "v", "down"]), feedforward_modules=targets(["down"]),
                         task_type="CAUSAL_LM")
    if method == "prompt-200":
        return PromptTuningConfig(num_virtual_tokens=200, task_type="CAUSAL_LM")
    raise SystemExit(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def run_one(arch_name: str, method: str, batch: int, seq: int, grad_ckpt: bool, stack: str = "plain",
            device: str = "cuda") -> dict:
    """One measurement, in this process (called in a fresh subprocess by main)."""
    import tempfile

    import peft
    import torch
    import transformers

    from peftpick.knowledge.architectures import build_config, resolve_model

    quant, optimizer_name, loss, trainer = STACKS[stack]
    cuda = device == "cuda"
    arch = resolve_model(arch_name)
    row = {"arch": arch_name, "method": method, "batch": batch, "seq": seq, "grad_ckpt": grad_ckpt,
           "torch": torch.__version__, "peft": peft.__version__, "transformers": transformers.__version__,
           "gpu": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)", "cuda": torch.version.cuda}
    if stack != "plain":
        row.update(stack=stack, quant=quant, optimizer=optimizer_name, loss=loss, trainer=trainer)
    torch.manual_seed(0)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    config = build_config(arch)
    with tempfile.TemporaryDirectory() as scratch:
        model = _base_model(config, quant, device, scratch)
        if cuda and quant != "none":  # measure training, not the load (from_pretrained quantizes as it loads)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        config_of_method = peft_config(method, arch)
        if trainer == "plain":
            model, trainable = _prepared(model, config_of_method, quant, grad_ckpt)
            row["weights_alloc"] = torch.cuda.memory_allocated() if cuda else 0
            row["trainable"] = sum(p.numel() for p in trainable)
            row["total"] = sum(p.numel() for p in model.parameters())
            if loss == "liger":
                from liger_kernel.transformers import _apply_liger_kernel_to_instance

                _apply_liger_kernel_to_instance(model=model.get_base_model() if hasattr(model, "get_base_model") else model)
            times = _plain_loop(model, trainable, _optimizer(optimizer_name, method, model, trainable), config,
                                batch, seq, device)
        else:
            times = _trainer_loop(trainer, model, config_of_method, quant, optimizer_name, config, batch, seq,
                                  grad_ckpt, device, scratch)
    row["peak_alloc"] = torch.cuda.max_memory_allocated() if cuda else 0
    row["peak_reserved"] = torch.cuda.max_memory_reserved() if cuda else 0
    row["step_s"] = min(times[1:]) if len(times) > 1 else (times[0] if times else None)
    return row


def _base_model(config, quant: str, device: str, scratch: str):
    import torch
    import transformers

    if quant == "none":
        with torch.device(device):
            return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    # the real loading path: save a bf16 copy, load it with the quantization config
    from peftpick.estimator.quantized import quantization_config
    from peftpick.knowledge.architectures import skip_weight_init

    with skip_weight_init():
        transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(scratch)
    return transformers.AutoModelForCausalLM.from_pretrained(
        scratch, quantization_config=quantization_config(quant, torch.bfloat16), device_map=device,
        dtype=torch.bfloat16)


def _prepared(model, config_of_method, quant: str, grad_ckpt: bool):
    """The plain loop's model: PEFT's k-bit preparation for a quantized base, checkpointing, the adapter."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    kwargs = {"use_reentrant": False}
    if quant != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=grad_ckpt,
                                                gradient_checkpointing_kwargs=kwargs)
    elif grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()
    if config_of_method is not None:
        model = get_peft_model(model, config_of_method)
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


def _optimizer(name: str, method: str, model, trainable):
    import torch

    if method.startswith("lorafa"):
        from peft.optimizers import create_lorafa_optimizer

        return create_lorafa_optimizer(model, r=32, lora_alpha=64, lr=1e-4, weight_decay=0.1)
    if name in ("adamw-8bit", "paged-adamw-8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit if name == "adamw-8bit" else bnb.optim.PagedAdamW8bit
        return cls(trainable, lr=1e-4, weight_decay=0.1)
    return torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.1)


def _plain_loop(model, trainable, optimizer, config, batch: int, seq: int, device: str) -> list[float]:
    import torch

    times = []
    out = None
    for _ in range(3):
        _sync(device)
        start = time.perf_counter()
        x = torch.randint(0, config.vocab_size, (batch, seq), device=device)
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _trainer_loop(trainer: str, model, config_of_method, quant: str, optimizer_name: str, config, batch: int,
                  seq: int, grad_ckpt: bool, device: str, scratch: str) -> list[float]:
    """Three optimizer steps of transformers' Trainer or TRL's SFTTrainer on random full-length sequences."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from peftpick.report.trainer_config import TRAINER_OPTIMIZERS

    ids = torch.randint(0, config.vocab_size, (3 * batch, seq)).tolist()
    common = dict(output_dir=scratch, max_steps=3, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                  gradient_checkpointing=grad_ckpt, gradient_checkpointing_kwargs={"use_reentrant": False},
                  optim=TRAINER_OPTIMIZERS[optimizer_name], learning_rate=1e-4, weight_decay=0.1, max_grad_norm=1.0,
                  bf16=device == "cuda", use_cpu=device != "cuda", report_to="none", save_strategy="no",
                  logging_steps=1, dataloader_pin_memory=False)
    times: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *_args, **_kwargs):
            _sync(device)
            times.append(-time.perf_counter())

        def on_step_end(self, *_args, **_kwargs):
            _sync(device)
            times[-1] += time.perf_counter()

    if trainer == "hf":
        from peft import get_peft_model, prepare_model_for_kbit_training
        from transformers import Trainer, TrainingArguments

        if quant != "none":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if config_of_method is not None:
            model = get_peft_model(model, config_of_method)
        run = Trainer(model=model, args=TrainingArguments(**common, remove_unused_columns=False),
                      train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}), callbacks=[StepTimes()])
    else:
        from trl import SFTConfig, SFTTrainer

        run = SFTTrainer(model=model, args=SFTConfig(**common, max_length=seq, packing=False),
                         train_dataset=Dataset.from_dict({"input_ids": ids}), processing_class=_tokenizer(config),
                         peft_config=config_of_method, callbacks=[StepTimes()])
    run.train()
    return times


def _tokenizer(config):
    """A word-level tokenizer over the model's vocabulary size (the data is token ids already; SFTTrainer wants
    a processing class for padding)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    vocab["t0"], vocab["t1"] = 0, 1
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t1"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t1", pad_token="t0", eos_token="t1")


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", type=Path, help="JSON lines file (default: benchmarks/results/<gpu>-training-peaks.jsonl)")
    parser.add_argument("--stacks", default="plain", help=f"comma-separated: {', '.join(STACKS)}")
    parser.add_argument("--levers", action="store_true",
                        help="every stack but plain on the lever grid (archs, LoRA q,v r32, 4 x 768 with and without "
                             "checkpointing); --archs / --methods / --stacks given explicitly still win")
    parser.add_argument("--shapes", help="BATCHxSEQ[c],... (c: checkpointing), e.g. 4x768,4x768c")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a dry run of the same code without memory figures")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: arch|method|batch|seq|ckpt|stack|device
    args = parser.parse_args(argv)
    if args.one:
        arch, method, batch, seq, ckpt, stack, device = args.one.split("|")
        print(json.dumps(run_one(arch, method, int(batch), int(seq), ckpt == "1", stack, device)))
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("measure_peaks.py needs a CUDA GPU (or --device cpu for a dry run without memory figures)",
              file=sys.stderr)
        return 1
    given = set(argv if argv is not None else sys.argv[1:])
    archs, methods, stacks, shapes = args.archs, args.methods, args.stacks, SHAPES
    if args.levers:
        archs = archs if "--archs" in given else ",".join(LEVER_ARCHS)
        methods = methods if "--methods" in given else ",".join(LEVER_METHODS)
        stacks = stacks if "--stacks" in given else ",".join(s for s in STACKS if s != "plain")
        shapes = LEVER_SHAPES
    if args.shapes:
        shapes = [(int(b), int(q.rstrip("c")), q.endswith("c"))
                  for b, q in (item.split("x") for item in args.shapes.split(","))]
    unknown = [s for s in stacks.split(",") if s not in STACKS]
    if unknown:
        print(f"unknown stack(s) {', '.join(unknown)}; known: {', '.join(STACKS)}", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    out = args.out or REPO / "benchmarks" / "results" / f"{gpu.replace(' ', '-').lower()}-training-peaks.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    for arch in archs.split(","):
        for method in methods.split(","):
            for stack in stacks.split(","):
                for batch, seq, ckpt in shapes:
                    spec = f"{arch}|{method}|{batch}|{seq}|{int(ckpt)}|{stack}|{args.device}"
                    _measure(spec, out, gpu)
    print(f"wrote {out}")
    return 0


def _measure(spec: str, out: Path, gpu: str) -> None:
    """Run one measurement in a fresh subprocess (an out-of-memory run cannot disturb the next) and append
    its row, or the error, to `out`."""
    arch, method, batch, seq, ckpt, stack, _device = spec.split("|")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--one", spec], capture_output=True, text=True)
    if done.returncode == 0:
        row = json.loads(done.stdout.strip().splitlines()[-1])
    else:
        last = (done.stderr.strip().splitlines() or ["failed"])[-1]
        row = {"arch": arch, "method": method, "batch": int(batch), "seq": int(seq), "grad_ckpt": ckpt == "1",
               "gpu": gpu, "error": "out of memory" if "OutOfMemoryError" in done.stderr else last[:300]}
        if stack != "plain":
            row["stack"] = stack
    with out.open("a") as file:  # one line per run: an interrupted sweep keeps what it measured
        file.write(json.dumps(row) + "\n")
    peak = (f"{row['peak_alloc'] / 2**30:.2f} / {row['peak_reserved'] / 2**30:.2f} GiB" if "peak_alloc" in row
            else row["error"])
    print(f"{spec:56s} {peak}  [{time.perf_counter() - started:.0f}s]", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
