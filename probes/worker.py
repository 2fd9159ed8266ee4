"""The worker process of a probe: `python -m peftpick.probes.worker --events-fd N`.

It imports torch, transformers and peft first and says "ready" (the parent starts workers ahead of need, so this
start-up overlaps the previous probe), then reads one job path from stdin, runs that one micro-training and
exits. One process per candidate and setting keeps a crash or an out-of-memory from touching another
measurement: each probe starts with a fresh CUDA context and allocator.

Events go to the parent as JSON lines on file descriptor N (stdout and stderr are left to the libraries and end
up in a log file): ready, started, loaded, step (with the loss and the live peak), result.

The probe runs its setting's whole stack, built as the estimate models it (probes.stack): the optimizer class
(torch AdamW / SGD, transformers Adafactor, bitsandbytes' 8-bit AdamW, PEFT's LoRA-FA), a bitsandbytes-quantized
base, the loss kernel (Liger's fused cross-entropy, TRL's chunked head) and the loop. With trainer "plain" the
loop is the one the memory estimator models (estimator/training.py), with gradient accumulation around it:

    for each micro-batch: out, loss = program.forward(model, batch); (loss / accumulation).backward()
    clip_grad_norm_(trainable, 1.0); optimizer.step(); optimizer.zero_grad(set_to_none=True)

With "hf" / "trl" transformers' Trainer / TRL's SFTTrainer run the steps (max_steps) with the same optimizer, and
a callback reports each step as this loop does. The result says what ran (its "stack" record).

What the model is, what a batch is and what its loss is belong to the job's workload (`job.probe_program`): the
causal LM's program is here (`out = model(input_ids=x, labels=x)`, loss `out.loss`), a diffusion denoiser's in
`peftpick.probes.diffusion`. `out` and the batch are kept until the next forward rebinds them, as in that loop.
Peak statistics are reset once the model, adapter and optimizer are built, so the peaks cover every training step (the warm-up step included, where the
optimizer state first appears) with the weights resident, but not transient loading buffers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import pickle
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from peftpick.probes.job import FAULTS_ENV, WORKLOAD_ENV, ProbeJob, ProbeProgram, probe_program
from peftpick.types import Workload

Send = Callable[..., None]
WEIGHT_DECAY = 0.1  # as in the benchmark runs and the estimator
MAX_GRAD_NORM = 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peftpick.probes.worker")
    parser.add_argument("--events-fd", type=int, required=True, help="file descriptor to write JSON events to")
    args = parser.parse_args(argv)
    # Ctrl-C belongs to the parent, which ends workers itself (they also run in their own session).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    events = os.fdopen(args.events_fd, "w", buffering=1, encoding="utf-8")

    def send(**message: Any) -> None:
        events.write(json.dumps(message) + "\n")

    started = time.time()
    # the heavy imports, done before the job arrives: those of the workload the parent is probing
    probe_program(os.environ.get(WORKLOAD_ENV) or Workload.CAUSAL_LM).preload()

    send(event="ready", at=time.time(), import_seconds=time.time() - started)
    line = sys.stdin.readline().strip()
    if not line:  # the parent did not need this worker
        return 0
    with open(line, "rb") as handle:
        job: ProbeJob = pickle.load(handle)
    send(event="started", at=time.time())
    result = run_job(job, send)
    send(event="result", **result)
    events.close()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown (a second or more with torch loaded): the parent waits for this exit
    # before the next probe touches the GPU, and the process's memory, the CUDA context included, goes with it.
    os._exit(0)


# ------------------------------------------------------------------------------------------- the probe


def run_job(job: ProbeJob, send: Send, wrap: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """Run `job` and return the result message (status ok / oom / error with what was measured). `wrap`: applied
    to the model once the adapter is on it, before the optimizer is built (probes.torchrun shards it there)."""
    import torch

    probe = _Probe(job, send, wrap)
    try:
        probe.run()
        probe.record["status"] = "ok"
    except Exception as error:  # every failure is a result; the parent decides what to do with it
        probe.record["status"] = "oom" if _is_out_of_memory(error) else "error"
        probe.record["error"] = f"{type(error).__name__}: {_first_line(error)}"
        if probe.record["status"] == "error":
            traceback.print_exc()
    finally:
        probe.record["phases"] = probe.phases
        if probe.cuda:
            probe.record["peak_allocated"] = torch.cuda.max_memory_allocated(probe.device)
            probe.record["peak_reserved"] = torch.cuda.max_memory_reserved(probe.device)
    return probe.record


class _Probe:
    """One probe in this process. After `run`, `model`, `optimizer` and `stack` are what trained (tests read
    them)."""

    def __init__(self, job: ProbeJob, send: Send, wrap: Callable[[Any], Any] | None = None):
        import torch

        from peftpick.probes.stack import Stack

        self.job = job
        self.wrap = wrap
        self.send = send
        self.program: ProbeProgram = probe_program(job.workload)
        self.device = torch.device(job.device)
        self.cuda = self.device.type == "cuda"
        self.phases: dict[str, float] = {}
        self.record: dict[str, Any] = {"losses": [], "versions": _versions(None, self.program, job.shape)}
        shape = job.shape
        self.stack = Stack(optimizer=shape.optimizer, quant=shape.quant, loss=shape.loss, trainer=shape.trainer)
        self.model: Any = None
        self.optimizer: Any = None
        self._nvml: Any = None
        self._clock = time.perf_counter()

    def _lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._clock
        self._clock = now

    def run(self) -> None:
        import torch

        job = self.job
        if self.cuda:
            from peftpick.probes.device import NvmlMemory, device_index

            self._nvml = NvmlMemory.open(device_index(job.device))  # baseline before this process touches the GPU
            torch.cuda.set_device(self.device)
            torch.empty(1, device=self.device)  # creates the CUDA context now, so "load" is only the model
            self.record["versions"] = _versions(torch.cuda.get_device_name(self.device), self.program, job.shape)
        self._lap("cuda_init")
        self.record["stack"] = self.stack.record()  # what was asked, until the model and optimizer are built

        model, trainable = self._model()
        if self.wrap is not None:
            model = self.wrap(model)
            trainable = [p for p in model.parameters() if p.requires_grad]  # the wrapper's (sharded) parameters
        optimizer = self._optimizer(model, trainable)
        self.model, self.optimizer = model, optimizer
        self.record.update(_parameter_counts(model))
        self.record["stack"] = self.stack.record()
        self.send(event="loaded", trainable=self.record["trainable"], total=self.record["total"])

        if self.stack.trainer in ("hf", "trl") and self.wrap is None:
            step_seconds = self._trainer_steps(model, optimizer, trainable)
        else:
            if self.stack.trainer in ("hf", "trl"):
                self.stack.trainer_run = "modelled"
                self.stack.notes.append(
                    f"{_TRAINER_NAMES[self.stack.trainer]} is not run under torchrun: the worker's loop "
                    "reproduces what the estimate models for it (the model output freed before backward"
                    + ("; TRL's chunked loss" if self.stack.trainer == "trl" else "") + ")")
            step_seconds = self._plain_steps(model, optimizer, trainable)

        measured = step_seconds[job.warmup_steps:]
        self.record["step_seconds"] = sum(measured) / len(measured)
        self.record["tokens_per_second"] = job.tokens_per_step * len(measured) / sum(measured)
        self._finish_stack(optimizer)
        if self.cuda:
            self.record["breakdown"] = _breakdown(model, optimizer, trainable, self.device,
                                                  torch.cuda.max_memory_allocated(self.device),
                                                  job.candidate.peft_config_class is None)
        if self._nvml is not None:
            self._nvml.sample()
            self.record["nvml_used"] = self._nvml.used_above_baseline

    # -- the loops

    def _start_measuring(self) -> None:
        """Peaks from here: the model, adapter and optimizer are built, nothing has trained yet."""
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._lap("load")

    def _step_done(self, step: int, step_loss: float, seconds: float) -> None:
        import torch

        job = self.job
        finite = math.isfinite(step_loss)
        self.record["losses"].append(step_loss if finite else None)
        peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else None
        if self._nvml is not None:
            self._nvml.sample()
        self.send(event="step", step=step, of=job.total_steps, loss=step_loss if finite else None,
                  peak_allocated=peak, seconds=seconds)
        self._lap("warmup" if step <= job.warmup_steps else "steps")

    def _plain_steps(self, model, optimizer, trainable) -> list[float]:
        """The worker's own loop (module docstring); with trainer "hf" / "trl" (modelled) the output is not kept."""
        import torch

        job, shape = self.job, self.job.shape
        next_batch = self.program.batches(job, self.device, getattr(torch, shape.dtype))
        keep_output = self.stack.trainer == "plain"
        self._start_measuring()
        fault = _fault_for(job)
        out = None
        step_seconds: list[float] = []
        for step in range(1, job.total_steps + 1):
            if fault is not None and fault["step"] == step:
                _trigger(fault)
            began = time.perf_counter()
            micro_losses = []
            for _ in range(shape.gradient_accumulation):
                batch = next_batch(shape.batch_size)
                out, loss = self.program.forward(model, batch)
                if not keep_output:  # Trainer.compute_loss returns the loss only: the logits go before backward
                    out = None
                (loss / shape.gradient_accumulation if shape.gradient_accumulation > 1 else loss).backward()
                micro_losses.append(loss.detach())
            torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_loss = float(torch.stack(micro_losses).float().mean())  # waits for the step to finish
            if self.cuda:
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - began
            step_seconds.append(seconds)
            self._step_done(step, step_loss, seconds)
        del out
        return step_seconds

    def _trainer_steps(self, model, optimizer, trainable) -> list[float]:
        """transformers' Trainer or TRL's SFTTrainer runs the steps (max_steps), with this probe's optimizer; a
        callback times each optimizer step and reports it as the plain loop does."""
        import tempfile

        import torch

        job, shape, stack = self.job, self.job.shape, self.stack
        fault = _fault_for(job)
        probe = self
        step_seconds: list[float] = []
        micro_losses: list[Any] = []
        clock = {"began": 0.0}

        from transformers import TrainerCallback

        class Measure(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                probe._start_measuring()
                clock["began"] = time.perf_counter()

            def on_step_begin(self, args, state, control, **kwargs):
                if fault is not None and fault["step"] == state.global_step + 1:
                    _trigger(fault)

            def on_step_end(self, args, state, control, **kwargs):
                # each micro-batch's loss as training_step returned it (already divided for accumulation)
                step_loss = float(torch.stack(micro_losses).float().sum()) if micro_losses else math.nan
                micro_losses.clear()
                if probe.cuda:
                    torch.cuda.synchronize(probe.device)
                now = time.perf_counter()
                step_seconds.append(now - clock["began"])
                clock["began"] = now
                probe._step_done(state.global_step, step_loss, step_seconds[-1])

        with tempfile.TemporaryDirectory(prefix="peftpick-trainer-") as output_dir:
            trainer = self.program.make_trainer(job, model, optimizer, output_dir, [Measure()], micro_losses, stack)
            trainer.train()
        del trainer
        if len(step_seconds) != job.total_steps:
            raise RuntimeError(f"{stack.trainer_run} ran {len(step_seconds)} optimizer steps, not {job.total_steps}")
        return step_seconds

    # -- building

    def _model(self):
        import torch

        job = self.job
        torch.manual_seed(job.seed)
        model = self.program.build_model(job, self.device, getattr(torch, job.shape.dtype))
        model = self.program.prepare_for_training(job, model, self.stack)
        if job.shape.gradient_checkpointing:
            self.program.enable_gradient_checkpointing(model)
        config = job.candidate.peft_config()
        if config is None:
            model.requires_grad_(True)
        else:
            from peft import get_peft_model

            torch.manual_seed(job.seed)
            model = get_peft_model(model, config)
            if self.stack.quant != "none" and self.stack.trainer == "trl" and (self.wrap is not None):
                from peftpick.probes.stack import cast_adapter_like_trl

                cast_adapter_like_trl(model)  # modelled SFTTrainer; the real one does it itself
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError(f"{job.candidate.display_name} left no trainable parameter in this model")
        return model, trainable

    def _optimizer(self, model, trainable):
        from peftpick.probes.stack import make_optimizer, qualified_name

        optimizer, notes = make_optimizer(self.stack.optimizer, model, trainable, self.job.learning_rate,
                                          WEIGHT_DECAY, self.device)
        self.stack.optimizer_class = qualified_name(optimizer)
        self.stack.notes.extend(notes)
        return optimizer

    def _finish_stack(self, optimizer) -> None:
        from peftpick.probes.stack import optimizer_state_bytes, paged_state_bytes

        state = optimizer_state_bytes(optimizer)
        self.stack.details["optimizer_state_bytes"] = json.dumps(state, sort_keys=True)
        paged = paged_state_bytes(optimizer)
        if paged:
            self.stack.notes.append(f"{paged:,} bytes of optimizer state are paged (CUDA unified memory, outside "
                                    "PyTorch's allocator): not in the torch peaks; NVML's figure includes them")
        self.record["stack"] = self.stack.record()


_TRAINER_NAMES = {"hf": "transformers' Trainer", "trl": "TRL's SFTTrainer"}


# ------------------------------------------------------------------------------------------- the causal LM


class CausalLMProgram(ProbeProgram):
    """A causal LM's probe: packed token blocks of the user's data (or the built-in sample), labels = inputs."""

    workload = Workload.CAUSAL_LM

    @property
    def default_methods(self) -> tuple[str, ...]:  # type: ignore[override]
        from peftpick.probes import DEFAULT_METHODS

        return DEFAULT_METHODS

    # -- the parent's side (the runner's functions: this is what probes did before there were workloads)

    def first_shape(self, arch, shape):
        from peftpick.errors import PeftpickError

        if shape.resolution is not None or shape.frames is not None:
            raise PeftpickError(f"a resolution or frame count is for image and video models, and {arch.name} is a "
                                "causal language model", "leave resolution and frames out; set seq_len instead")
        return shape

    def check(self, arch, options, device):
        if device == "cpu":
            from peftpick.probes.runner import _check_cpu_size

            _check_cpu_size(arch)

    def weights_source(self, arch, random_weights):
        from peftpick.probes.runner import lm_weights_source

        return lm_weights_source(arch, random_weights)

    def load_data(self, options, settings):
        from peftpick.probes.data import load_probe_data
        from peftpick.probes.runner import _chars_to_read

        return load_probe_data(options.data, text_field=options.text_field, prompt_field=options.prompt_field,
                               response_field=options.response_field, max_chars=_chars_to_read(settings, options))

    def prepare_inputs(self, run):
        from peftpick.probes.runner import pack_tokens

        return pack_tokens(run)

    def tokens_per_step(self, job):
        return job.shape.batch_size * job.shape.gradient_accumulation * job.shape.seq_len

    def refusal(self, arch, candidate, shape, device, world_size=1):
        from peftpick.probes.stack import causal_lm_refusal

        return causal_lm_refusal(arch, candidate, shape, device, world_size)

    def runnable(self, shape, device):
        from peftpick.probes.stack import causal_lm_runnable

        return causal_lm_runnable(shape, device)

    # -- the worker's side

    fused: str | None = None  # the loss kernel `forward` calls: None (the model's own loss) or "chunked"

    def preload(self):
        import peft  # noqa: F401
        import torch  # noqa: F401
        from transformers import AutoModelForCausalLM  # noqa: F401

    def build_model(self, job, device, dtype):
        """The model on `device` in `dtype`; with `job.shape.quant` its linear layers quantized by bitsandbytes as
        from_pretrained(quantization_config=...) makes them (probes.stack)."""
        import torch
        from transformers import AutoModelForCausalLM

        quant = job.shape.quant
        if job.weights is None:
            from peftpick.knowledge.architectures import build_config

            # a quantized base is built on the CPU and quantized onto the device one layer at a time, as loading
            # does: the full-precision model need not fit on the GPU
            with torch.device("cpu" if quant != "none" else device):
                model = AutoModelForCausalLM.from_config(build_config(job.architecture), dtype=dtype)
            if quant == "none":
                return model
            from peftpick.probes.stack import quantize_built

            return quantize_built(model, quant, device, dtype)
        if quant != "none":
            from peftpick.probes.stack import load_quantized

            return load_quantized(job.weights, quant, device, dtype, job.local_files_only)
        options: dict[str, Any] = {"dtype": dtype, "local_files_only": job.local_files_only}
        if device.type == "cuda":
            options["device_map"] = {"": device.index or 0}  # load straight onto the GPU
        return AutoModelForCausalLM.from_pretrained(job.weights, **options)

    def prepare_for_training(self, job, model, stack):
        """k-bit preparation (not for TRL's SFTTrainer, which does not call it) and the loss kernel, on the bare
        model (before PEFT wraps it), as the estimate builds them."""
        from peftpick.probes import stack as stacks

        if stack.quant != "none":
            stack.details["quant"] = stacks.quantized_summary(model)
            if stack.trainer == "trl":
                stack.details["kbit_preparation"] = ("not called (TRL's SFTTrainer does not call prepare_model_"
                                                     "for_kbit_training; it casts the adapter to bf16)")
            else:
                from peft import prepare_model_for_kbit_training

                # gradient checkpointing, when asked for, is enabled afterwards as for any base
                model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
                stack.details["kbit_preparation"] = "peft.prepare_model_for_kbit_training (other weights to float32)"
        if stack.loss == "liger":
            if job.device.startswith("cuda"):
                stack.details["loss"] = stacks.apply_liger(model)
            else:  # the parent turns this into the stock loss before a CPU probe starts; never silently
                stack.loss = "stock"
                stack.notes.append(stacks.LIGER_NEEDS_CUDA)
        elif stack.loss == "chunked" and stack.trainer != "trl":  # SFTTrainer adds its own head
            stack.details["loss"] = stacks.add_chunked_head(model)
            self.fused = "chunked"
        elif stack.loss == "chunked":
            stack.details["loss"] = "trl.SFTTrainer's fused LM head (add_fused_lm_head, chunked log-prob kernel)"
        if stack.loss == "stock":
            stack.details["loss"] = "the model's own loss: out = model(input_ids=x, labels=x); out.loss"
        return model

    def enable_gradient_checkpointing(self, model):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()

    def _tokens(self, job):
        import torch

        return torch.load(job.tokens_path, weights_only=True)

    def batches(self, job, device, dtype):
        tokens = self._tokens(job)
        rows = tokens.shape[0]
        cursor = 0

        def next_batch(size: int):
            nonlocal cursor
            rows_now = [(cursor + offset) % rows for offset in range(size)]
            cursor += size
            return tokens[rows_now].to(device)

        return next_batch

    def forward(self, model, batch):
        if self.fused == "chunked":
            out = model(input_ids=batch, labels=batch, fused_lm_head=True)
        else:
            out = model(input_ids=batch, labels=batch)
        return out, out.loss

    def make_trainer(self, job, model, optimizer, output_dir, callbacks, micro_losses, stack):
        """transformers' Trainer (trainer "hf") or TRL's SFTTrainer ("trl") over this probe's token rows, with
        this probe's optimizer and a constant learning rate, max_steps = the probe's steps; `micro_losses` gets
        what each training_step returns."""
        return _make_trainer(self, job, model, optimizer, output_dir, callbacks, micro_losses, stack)


def causal_lm_program() -> CausalLMProgram:
    """The `probe_program` hook of causal LMs (peftpick.workloads)."""
    return CausalLMProgram()


# ------------------------------------------------------------------------------------------- helpers


def _make_trainer(program, job: ProbeJob, model, optimizer, output_dir: str, callbacks: list, micro_losses: list,
                  stack) -> Any:
    """The trainer of `stack.trainer` over the probe's token rows (CausalLMProgram.make_trainer)."""
    import torch

    shape = job.shape
    cuda = job.device.startswith("cuda")
    tokens = program._tokens(job)
    rows = job.total_steps * shape.effective_batch
    tokens = tokens[[index % tokens.shape[0] for index in range(rows)]]
    settings: dict[str, Any] = {
        "output_dir": output_dir, "max_steps": job.total_steps, "per_device_train_batch_size": shape.batch_size,
        "gradient_accumulation_steps": shape.gradient_accumulation, "learning_rate": job.learning_rate,
        "weight_decay": WEIGHT_DECAY, "max_grad_norm": MAX_GRAD_NORM, "lr_scheduler_type": "constant",
        "warmup_steps": 0, "logging_strategy": "no", "save_strategy": "no", "eval_strategy": "no",
        "report_to": "none", "disable_tqdm": True, "bf16": False, "fp16": False,
        # enabled on the model already (use_reentrant=False), as Trainer would enable it
        "gradient_checkpointing": False, "seed": job.seed, "data_seed": job.seed, "dataloader_num_workers": 0,
        "dataloader_pin_memory": cuda, "use_cpu": not cuda, "remove_unused_columns": False,
    }
    # the probe's own optimizer (its class is the estimate's), at a constant rate as in the plain loop
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    fused = program.fused

    if stack.trainer == "trl":
        import datasets
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**settings, max_length=None, packing=False, padding_free=False, completion_only_loss=False,
                         dataset_num_proc=None)
        base: Any = SFTTrainer
        extra: dict[str, Any] = {"train_dataset": datasets.Dataset.from_dict({"input_ids": tokens.tolist()}),
                                 "processing_class": _stand_in_tokenizer()}
        stack.trainer_run = "trl.SFTTrainer"
        stack.details["trainer"] = (f"trl.SFTTrainer.train(), max_steps={job.total_steps}, the probe's optimizer "
                                    "through optimizers=, token rows given as input_ids (a stand-in tokenizer for "
                                    "the pad token; every row is full, nothing is padded)")
    else:
        from transformers import Trainer, TrainingArguments, default_data_collator

        args = TrainingArguments(**settings)
        base = Trainer
        extra = {"train_dataset": _TokenRows(tokens), "data_collator": default_data_collator}
        stack.trainer_run = "transformers.Trainer"
        stack.details["trainer"] = (f"transformers.Trainer.train(), max_steps={job.total_steps}, the probe's "
                                    "optimizer through optimizers= (not Trainer's default adamw_torch_fused)")
    if cuda:
        _ = args._setup_devices
        args._n_gpu = 1  # one process, one GPU: never nn.DataParallel over the other GPUs of the machine

    class ProbeTrainer(base):  # type: ignore[misc, valid-type]
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            micro_losses.append(loss)
            return loss

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if fused == "chunked":  # TRL's chunked head, added by the probe, under transformers' Trainer
                inputs = {**inputs, "fused_lm_head": True}
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return ProbeTrainer(model=model, args=args, callbacks=callbacks, optimizers=(optimizer, schedule), **extra)


class _TokenRows:
    """The probe's token rows as a torch Dataset of {"input_ids", "labels"} (labels = inputs, as in the plain
    loop)."""

    def __init__(self, tokens):
        self.tokens = tokens

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.tokens[index]
        return {"input_ids": row, "labels": row}


def _stand_in_tokenizer():
    """A one-token tokenizer for SFTTrainer, which wants one for its pad token; the rows are token ids already."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0}, unk_token="<pad>")),
                                   pad_token="<pad>")




def _parameter_counts(model) -> dict[str, int]:
    total = trainable = 0
    for parameter in model.parameters():  # shared (tied) parameters are listed once
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return {"trainable": trainable, "total": total}


def _breakdown(model, optimizer, trainable, device, peak: int, full: bool) -> dict[str, int]:
    """Bytes at the peak by part: what stays resident is counted (weights, adapter, optimizer state); the rest of
    the peak (gradients, activations, logits, temporaries) is one part, measured as the difference."""
    seen: set[int] = set()

    def nbytes(tensors) -> int:
        total = 0
        for tensor in tensors:
            tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a rank's shard (FSDP2)
            if tensor.device != device or tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
        return total

    trainable_ids = {id(p) for p in trainable}
    adapter = 0 if full else nbytes(trainable)
    weights = nbytes([p for p in model.parameters() if full or id(p) not in trainable_ids]) + nbytes(model.buffers())
    state = nbytes([value for entry in optimizer.state.values() for value in entry.values()
                    if hasattr(value, "data_ptr")])
    parts = {"weights": weights, "adapter": adapter, "optimizer": state}
    rest = peak - sum(parts.values())
    if rest < 0:  # the peak came before the optimizer state existed: no honest split
        return {"measured peak": peak}
    parts["grads, activations and temporaries"] = rest
    return {name: value for name, value in parts.items() if value or name == "weights"}


def _versions(gpu: str | None, program: ProbeProgram | None = None, shape: Any = None) -> dict[str, str]:
    import platform
    from importlib import metadata

    import peft
    import torch
    import transformers

    from peftpick import __version__
    from peftpick.probes.stack import libraries

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                "python": platform.python_version(), "peftpick": __version__}
    for name in (program.library_names if program is not None else ()):
        if name not in versions:
            versions[name] = getattr(importlib.import_module(name), "__version__", "unknown")
    for name in (libraries(shape) if shape is not None else ()):  # what the stack runs: bitsandbytes, trl, ...
        if name not in versions:
            try:
                versions[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                versions[name] = "not installed"
    if torch.version.cuda:
        versions["cuda"] = torch.version.cuda
    if gpu:
        versions["gpu"] = gpu
    return versions


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    # cuBLAS / cuDNN and the CPU allocator report memory exhaustion as plain RuntimeErrors
    return isinstance(error, RuntimeError) and any(
        marker in text for marker in ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "can't allocate memory"))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else "no message")[:500]


def _fault_for(job: ProbeJob) -> dict[str, Any] | None:
    """The test-only fault planned for this job (see job.FAULTS_ENV), or None."""
    raw = os.environ.get(FAULTS_ENV)
    if not raw:
        return None
    fault = json.loads(raw).get(job.candidate.method)
    if not fault:
        return None
    if job.shape.batch_size <= int(fault.get("above_micro_batch", 0)):
        return None
    if fault.get("unless_checkpointing") and job.shape.gradient_checkpointing:
        return None
    if "rank" in fault and int(fault["rank"]) != int(os.environ.get("RANK", 0)):
        return None
    return {"kind": fault["kind"], "step": int(fault.get("step", 1))}


def _trigger(fault: dict[str, Any]) -> None:
    import torch

    kind = fault["kind"]
    if kind == "oom":
        raise torch.OutOfMemoryError(f"simulated out of memory at step {fault['step']} ({FAULTS_ENV})")
    if kind == "error":
        raise RuntimeError(f"simulated failure at step {fault['step']} ({FAULTS_ENV})")
    if kind == "crash":
        os._exit(70)  # dies without a result, as a segfault or a killed process would
    if kind == "hang":
        time.sleep(3600)
    raise ValueError(f"unknown fault kind {kind!r} in {FAULTS_ENV}")


if __name__ == "__main__":
    sys.exit(main())
