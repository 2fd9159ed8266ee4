"""The denoiser estimate's second training step, made from the first, against the same step traced: event for event.

    python benchmarks/second_step_check.py [--suite] [REQUEST ...]

A REQUEST is `model,vram,serve[,resolution[,optimizer]]` (default: flux.2-klein-4b,12,comfyui); every
denoiser estimate the recommendation runs is traced twice, with the second step made from the first
(`estimator.synthesis.second_step_from_first`) and with both steps traced, and the two traces are compared up to
the end of the traced steps, handles renumbered by first appearance: events, phase marks, breakdown tags,
phases and block owners. `--suite` adds the 31 runs of PEFT's image-generation suite (the memory table's
programs; needs ../shared). Prints one line per estimate (made / traced where the first step leaves what cannot
be made, with the seconds of each way) and a summary; exits 1 if any made step differs from its traced one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def traced_steps(arch, config, shape, program, synthesize: bool):
    """(canonical trace or None where the program would be traced again, second step made?, seconds)."""
    from peftpick.estimator import diffusion_trace

    prog = diffusion_trace._Program(arch, config, shape, program, False, synthesize=synthesize)
    start = time.perf_counter()
    with diffusion_trace.run_code_of(program.diffusers_version), diffusion_trace.deterministic_gc():
        prog.prepare()
        trace, _steps = prog.trace_steps()
    seconds = time.perf_counter() - start
    return (None if trace is None else trace.canonical()), prog.second_step_made, seconds


def request_jobs(requests: list[str]) -> list[tuple]:
    from peftpick.estimator.diffusion import DenoiserProgram
    from peftpick.recommender import planning, recommend

    jobs = []
    guarded = planning._guarded

    def recording(estimator, job):
        arch, config, shape = job
        if arch.denoiser is not None:
            label = (f"{arch.name} {type(config).__name__ if config is not None else 'full'} "
                     f"micro-batch {shape.batch_size} checkpointing {int(shape.gradient_checkpointing)} {shape.optimizer}")
            jobs.append((label, arch, config, shape, DenoiserProgram()))
        return guarded(estimator, job)

    planning._guarded = recording
    try:
        for request in requests:
            fields = request.split(",")
            extra = {}
            if len(fields) > 3 and fields[3]:
                extra["resolution"] = int(fields[3])
            if len(fields) > 4 and fields[4]:
                extra["optimizer"] = fields[4]
            recommend(fields[0], float(fields[1]), fields[2], cache=False, workers=1, probe=False, **extra)
    finally:
        planning._guarded = guarded
    return jobs


def suite_jobs(suite: Path) -> list[tuple]:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import compare_imagegen_estimates as table

    from peftpick.estimator.diffusion import peft_image_suite
    from peftpick.types import TrainingShape

    arch = table.klein_architecture()
    jobs = []
    for file in sorted((suite / "results").glob("*.json")):
        run = json.loads(file.read_text())
        train = run["run_info"]["train_config"]
        shape = TrainingShape(batch_size=int(train["batch_size"]), gradient_checkpointing=bool(train["use_gc"]),
                              dtype=train["dtype"], resolution=int(train["resolution"]))
        program = peft_image_suite(train, diffusers_version=run["meta_info"]["package_info"].get("diffusers-version"))
        jobs.append((run["run_info"]["experiment_name"], arch, table.peft_config_of(run), shape, program))
    return jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("requests", nargs="*", default=["flux.2-klein-4b,12,comfyui"])
    parser.add_argument("--suite", action="store_true", help="add the 31 runs of PEFT's image-generation suite")
    parser.add_argument("--suite-folder", type=Path,
                        default=REPO.parent / "shared" / "peft-method-comparison" / "image-gen")
    args = parser.parse_args(argv)
    os.environ.setdefault("PEFTPICK_CACHE_DIR", tempfile.mkdtemp())
    jobs = request_jobs(args.requests) + (suite_jobs(args.suite_folder) if args.suite else [])
    differ = made_count = 0
    seconds = [0.0, 0.0]
    for label, arch, config, shape, program in jobs:
        traced, _, traced_s = traced_steps(arch, config, shape, program, synthesize=False)
        made, was_made, made_s = traced_steps(arch, config, shape, program, synthesize=True)
        seconds[0] += traced_s
        seconds[1] += made_s
        made_count += was_made
        if made is None:  # traced again from the start, both steps for real: the same by construction
            verdict = "traced again"
        elif made == traced:
            verdict = "same"
        else:
            differ += 1
            verdict = "DIFFERS"
        how = "made" if was_made else "traced"
        print(f"{verdict:<12} {how:<6} {label}  (both traced {traced_s:.2f} s, second made {made_s:.2f} s)", flush=True)
    print(f"{len(jobs)} estimates: second step made in {made_count}, {differ} differing from the traced step; "
          f"{seconds[0]:.1f} s with both steps traced, {seconds[1]:.1f} s with the second made")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
