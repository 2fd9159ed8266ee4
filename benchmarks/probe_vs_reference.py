"""Does a probe measure the same peak memory as a plain training loop? (needs a CUDA GPU for the real figure)

    python benchmarks/probe_vs_reference.py          # lora, dora, lora-fa, oft, ia3, prompt tuning, full fine-tuning
                                                     # on Llama-3.2-3B (random weights), batch 4 x 768, 10 steps
    python benchmarks/probe_vs_reference.py --model smollm2-135m --device cpu --seq-len 64 --batch-size 1 \\
        --steps 2 --methods lora,ia3                 # CPU dry run: both sides run end to end, no memory figures

For each method it runs `peftpick.probe(...)` (random weights, cache off), then a reference: a plain, independent
training loop in a fresh Python process (clean CUDA context and allocator), on the same device, with the same model
config, dtype, candidate (`build_candidate(...).peft_config()`, its optimizer), setting (the one the probe measured,
after any out-of-memory retry) and number of optimizer steps (warm-up + measured):

    model = AutoModelForCausalLM.from_config(build_config(arch), dtype=...) on the device; get_peft_model(model, cfg)
    optimizer = AdamW(trainable, lr, weight_decay=0.1)   (LoRA-FA: peft.optimizers.create_lorafa_optimizer)
    for each step: for each micro-batch: out = model(input_ids=x, labels=x); (out.loss / accumulation).backward()
                   clip_grad_norm_(trainable, 1.0); optimizer.step(); optimizer.zero_grad(set_to_none=True)

It is the loop of benchmarks/measure_peaks.py (whose rows validate the memory estimator), written out here rather
than imported because `measure_peaks.run_one` is CUDA-only, runs a fixed three steps and takes its adapter configs
from its own grid names, while this comparison needs the catalogue candidate, the probe's step count and the CPU
dry run. Like measure_peaks.py the reference's peaks cover the whole process (statistics reset and cache emptied
before the model is built); the peaks of the training steps alone (reset after the model and optimizer are built,
the probe's own convention) are recorded too.

Prints per method the probe's and the reference's peak allocated and reserved memory and the difference
(100 * (probe / reference - 1)), then the median and maximum absolute difference. Target: within 2 %. Writes JSON
lines (one per method, then a summary line), with the GPU name and library versions, to
benchmarks/results/<gpu>-probe-vs-reference.jsonl or --save. On the CPU nothing measures memory: the run is a dry
run that checks both sides end to end and writes nothing unless --save is given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # probe_speed, beside this script

from probe_speed import (  # noqa: E402
    REPO,
    RESULTS,
    cpu_name,
    device_index,
    gib,
    gpu_facts,
    gpu_slug,
    now_iso,
    parent_versions,
    wants_cpu,
)

METHODS = ["lora", "dora", "lora-fa", "oft", "ia3", "prompt-tuning", "full"]
TARGET_PCT = 2.0
WEIGHT_DECAY = 0.1  # as in measure_peaks.py, the benchmark runs and the estimator
MAX_GRAD_NORM = 1.0
REFERENCE_TIMEOUT_S = 1800
MARKER = "REFERENCE_RESULT "


# ------------------------------------------------------------------------------------------- the reference loop


def reference_run(spec: dict[str, Any]) -> dict[str, Any]:
    """One plain training run in this process (main starts a fresh process for each)."""
    import peft
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from peftpick.knowledge.architectures import build_config, resolve_model
    from peftpick.methods import build_candidate, get_method

    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    if cuda and device.index is None:  # torch.cuda.set_device needs an index
        device = torch.device("cuda", 0)
    row: dict[str, Any] = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                        "peft": peft.__version__}}
    if cuda:
        torch.cuda.set_device(device)
        row["versions"]["cuda"] = torch.version.cuda
        row["gpu"] = torch.cuda.get_device_name(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    arch = resolve_model(spec["model"])
    candidate = build_candidate(get_method(spec["method"]), arch)
    config = build_config(arch)
    torch.manual_seed(spec.get("seed", 0))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, spec["dtype"]))
    if spec["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_config = candidate.peft_config()
    if peft_config is None:
        model.requires_grad_(True)
    else:
        model = peft.get_peft_model(model, peft_config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if candidate.optimizer == "lora-fa":
        from peft.optimizers import create_lorafa_optimizer

        lora = model.peft_config["default"]
        optimizer = create_lorafa_optimizer(model, r=lora.r, lora_alpha=lora.lora_alpha, lr=candidate.learning_rate,
                                            weight_decay=WEIGHT_DECAY, use_rslora=lora.use_rslora)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=candidate.learning_rate, weight_decay=WEIGHT_DECAY)
    row["trainable_params"] = sum(p.numel() for p in trainable)
    if cuda:
        torch.cuda.synchronize(device)
        row["resident_allocated"] = torch.cuda.memory_allocated(device)
        row["build_peak_allocated"] = torch.cuda.max_memory_allocated(device)
        row["build_peak_reserved"] = torch.cuda.max_memory_reserved(device)
        torch.cuda.reset_peak_memory_stats(device)
    row["build_seconds"] = time.perf_counter() - started

    batch, seq, accumulation = spec["batch_size"], spec["seq_len"], spec["gradient_accumulation"]
    vocab = int(config.vocab_size)
    times, losses = [], []
    out = None
    for _ in range(spec["total_steps"]):
        began = time.perf_counter()
        for _ in range(accumulation):
            x = torch.randint(0, vocab, (batch, seq), device=device)
            out = model(input_ids=x, labels=x)
            (out.loss / accumulation if accumulation > 1 else out.loss).backward()
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = float(out.loss.detach().float())
        losses.append(loss if math.isfinite(loss) else None)  # JSON has no NaN
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - began)
    del out
    measured = times[spec["warmup_steps"]:] or times
    row["step_seconds"] = sum(measured) / len(measured)
    row["tokens_per_second"] = batch * accumulation * seq * len(measured) / sum(measured)
    row["losses"] = losses
    if cuda:
        row["train_peak_allocated"] = torch.cuda.max_memory_allocated(device)
        row["train_peak_reserved"] = torch.cuda.max_memory_reserved(device)
        row["peak_allocated"] = max(row["build_peak_allocated"], row["train_peak_allocated"])
        row["peak_reserved"] = max(row["build_peak_reserved"], row["train_peak_reserved"])
    row["status"] = "ok"
    return row


def run_reference(spec: dict[str, Any]) -> dict[str, Any]:
    """`reference_run(spec)` in a fresh Python process; a dict with status and, on failure, the error."""
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                              cwd=REPO, timeout=REFERENCE_TIMEOUT_S,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    except subprocess.TimeoutExpired:
        return {"status": "error", "error": f"timed out after {REFERENCE_TIMEOUT_S} s",
                "wall_seconds": time.perf_counter() - started}
    wall = time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARKER)]
    if done.returncode == 0 and lines:
        row = json.loads(lines[-1][len(MARKER):])
    else:
        text = done.stderr.strip()
        last = (text.splitlines() or [f"exit code {done.returncode}"])[-1]
        row = {"status": "oom" if "OutOfMemoryError" in text else "error", "error": last[:500]}
    row["wall_seconds"] = wall
    return row


# ------------------------------------------------------------------------------------------- comparison


def pct(probe: int | None, reference: int | None) -> float | None:
    if probe is None or not reference:
        return None
    return 100.0 * (probe / reference - 1.0)


def setting_words(shape: Any) -> str:
    words = f"{shape.batch_size}x{shape.seq_len}"
    if shape.gradient_accumulation > 1:
        words += f" acc{shape.gradient_accumulation}"
    return words + (" ckpt" if shape.gradient_checkpointing else "")


def fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3.2-3b", help="bundled name, folder or hub id (random weights)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated catalogue keys")
    parser.add_argument("--steps", type=int, default=10, help="measured steps (both sides add one warm-up step)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=768)
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: the GPU; cpu makes it a dry run)")
    parser.add_argument("--save", type=Path, help="JSON lines file to write (default on a GPU: "
                        "benchmarks/results/<gpu>-probe-vs-reference.jsonl; on the CPU: nothing)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one reference run (JSON spec) in this process
    args = parser.parse_args(argv)
    if args.one:
        print(MARKER + json.dumps(reference_run(json.loads(args.one))), flush=True)
        return 0

    from peftpick.errors import PeftpickError
    from peftpick.probes import probe

    methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    dry_run = wants_cpu(args.device)
    facts = {} if dry_run else gpu_facts(device_index(args.device))
    if not dry_run and not facts:
        print("probe_vs_reference.py needs a CUDA GPU (none found through NVML). For a CPU dry run of the script "
              "pass --device cpu with a small model, e.g. --model smollm2-135m --device cpu --seq-len 64 "
              "--batch-size 1 --steps 2 --methods lora,ia3", file=sys.stderr)
        return 1
    device = "cpu" if dry_run else (args.device or "cuda:0").strip().lower()
    if device == "cuda":
        device = "cuda:0"
    print(("CPU DRY RUN (no GPU: checks both sides end to end; the memory comparison needs a GPU)" if dry_run
           else f"GPU run on {facts['gpu']}")
          + f"\n{args.model} (random weights), batch {args.batch_size} x {args.seq_len}, {args.steps} steps + 1 "
          f"warm-up; methods {', '.join(methods)}", flush=True)

    def say(text: str) -> None:
        if ": step " not in text:  # one line per probe start and end, not per step
            print(f"  {text}", flush=True)

    started = time.perf_counter()
    try:
        results = probe(args.model, methods, random_weights=True, cache=False, device=device, steps=args.steps,
                        batch_size=args.batch_size, seq_len=args.seq_len, progress=say)
    except PeftpickError as error:
        print(f"probe failed: {error}", file=sys.stderr)
        return 1
    print(f"probes done in {time.perf_counter() - started:.1f} s; reference runs:", flush=True)

    rows: list[dict[str, Any]] = []
    for result in results:
        shape = result.shape
        spec = {"model": args.model, "method": result.method, "device": device, "dtype": shape.dtype,
                "batch_size": shape.batch_size, "seq_len": shape.seq_len,
                "gradient_accumulation": shape.gradient_accumulation,
                "gradient_checkpointing": shape.gradient_checkpointing,
                "warmup_steps": 1, "total_steps": args.steps + 1, "seed": 0}
        if result.status == "ok":
            reference = run_reference(spec)
        else:
            reference = {"status": "skipped", "error": f"the probe did not succeed ({result.status})"}
        print(f"  {result.display_name or result.method}: reference {reference['status']}"
              + (f" in {reference['wall_seconds']:.1f} s" if "wall_seconds" in reference else "")
              + (f": {reference['error']}" if reference.get("error") else ""), flush=True)
        rows.append({
            "kind": "run",
            "method": result.method,
            "display_name": result.display_name,
            "setting": spec,
            "requested_shape_out_of_memory": bool(result.oom_settings),
            "probe": {"status": result.status, "error": result.error, "device": result.device,
                      "peak_allocated": result.peak_allocated_bytes, "peak_reserved": result.peak_reserved_bytes,
                      "nvml_used": result.nvml_used_bytes, "tokens_per_second": result.tokens_per_second,
                      "wall_seconds": result.wall_seconds, "trainable_params": result.trainable_params,
                      "versions": result.versions},
            "reference": reference,
            "diff_allocated_pct": pct(result.peak_allocated_bytes, reference.get("peak_allocated")),
            "diff_reserved_pct": pct(result.peak_reserved_bytes, reference.get("peak_reserved")),
            "diff_allocated_vs_training_only_pct": pct(result.peak_allocated_bytes,
                                                       reference.get("train_peak_allocated")),
            "diff_reserved_vs_training_only_pct": pct(result.peak_reserved_bytes,
                                                      reference.get("train_peak_reserved")),
        })

    gpu = None if dry_run else next((r["reference"].get("gpu") for r in rows if r["reference"].get("gpu")),
                                    facts.get("gpu"))
    print(f"\nPeak memory, probe vs plain reference loop ({'CPU DRY RUN' if dry_run else f'measured on {gpu}'}); "
          "GiB, difference = 100 * (probe / reference - 1)")
    header = (f"{'method':<18} {'setting':<12} {'probe alloc':>11} {'ref alloc':>10} {'diff %':>7} "
              f"{'probe resv':>11} {'ref resv':>10} {'diff %':>7} {'tok/s probe':>11} {'tok/s ref':>10}  status")
    print(header)
    print("-" * len(header))
    for row in rows:
        probe_side, reference = row["probe"], row["reference"]
        status = f"probe {probe_side['status']}, reference {reference['status']}"
        shape_words = setting_words(next(r for r in results if r.method == row["method"]).shape)
        tps_probe = probe_side["tokens_per_second"]
        tps_ref = reference.get("tokens_per_second")
        print(f"{row['display_name'][:18]:<18} {shape_words:<12} {gib(probe_side['peak_allocated']):>11} "
              f"{gib(reference.get('peak_allocated')):>10} {fmt_pct(row['diff_allocated_pct']):>7} "
              f"{gib(probe_side['peak_reserved']):>11} {gib(reference.get('peak_reserved')):>10} "
              f"{fmt_pct(row['diff_reserved_pct']):>7} {'-' if tps_probe is None else f'{tps_probe:,.0f}':>11} "
              f"{'-' if tps_ref is None else f'{tps_ref:,.0f}':>10}  {status}")
    print("-" * len(header))

    allocated = [abs(r["diff_allocated_pct"]) for r in rows if r["diff_allocated_pct"] is not None]
    reserved = [abs(r["diff_reserved_pct"]) for r in rows if r["diff_reserved_pct"] is not None]
    summary: dict[str, Any] = {"kind": "summary", "compared": len(allocated), "methods": methods,
                               "target_pct": TARGET_PCT}
    if allocated:
        summary.update({
            "allocated_abs_diff_pct": {"median": statistics.median(allocated), "max": max(allocated)},
            "reserved_abs_diff_pct": {"median": statistics.median(reserved), "max": max(reserved)} if reserved
            else None,
        })
        summary["target_met"] = max(allocated) <= TARGET_PCT and (not reserved or max(reserved) <= TARGET_PCT) \
            and len(allocated) == len(rows)
        print(f"|difference|, allocated: median {statistics.median(allocated):.2f} %, max {max(allocated):.2f} %")
        if reserved:
            print(f"|difference|, reserved:  median {statistics.median(reserved):.2f} %, max {max(reserved):.2f} %")
        print(f"target: within {TARGET_PCT:g} % for every method: {'met' if summary['target_met'] else 'MISSED'}"
              + ("" if len(allocated) == len(rows) else f" ({len(rows) - len(allocated)} method(s) not compared)"))
        differing = [r["display_name"] for r in rows
                     if r["reference"].get("build_peak_allocated", 0) > r["reference"].get("train_peak_allocated", 1)]
        if differing:
            print("note: building the model peaked above training for " + ", ".join(differing)
                  + ": the probe resets its statistics after the build (see diff_*_vs_training_only_pct in the JSON)")
    else:
        summary["target_met"] = None
        print("The memory comparison needs a GPU: on the CPU neither the probe nor the reference measures memory."
              if dry_run else "nothing was compared: no method succeeded on both sides")
    ran = all(r["probe"]["status"] == "ok" and r["reference"]["status"] == "ok" for r in rows)
    if dry_run:
        print(f"end to end: {'every probe and reference run finished' if ran else 'some runs FAILED (see above)'}")

    common = {"benchmark": "probe_vs_reference", "dry_run": dry_run, "measured_at": now_iso(), "gpu": gpu,
              "device": "cpu" if dry_run else gpu, "cpu": cpu_name(), "gpu_facts": facts, "model": args.model,
              "parent_versions": parent_versions()}
    save = args.save or (None if dry_run else RESULTS / f"{gpu_slug(gpu or 'unknown-gpu')}-probe-vs-reference.jsonl")
    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        save.write_text("".join(json.dumps({**common, **row}) + "\n" for row in [*rows, summary]))
        print(f"wrote {save}")
    else:
        print("CPU dry run: nothing written (pass --save PATH to keep the JSON lines)")
    return 0 if ran and summary.get("target_met") is not False else 1


if __name__ == "__main__":
    raise SystemExit(main())
