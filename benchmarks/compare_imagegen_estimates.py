"""Compare the denoiser memory estimate with the PEFT image-generation suite's measurements.

    python benchmarks/compare_imagegen_estimates.py [--suite ../shared/peft-method-comparison/image-gen]
        [--results benchmarks/results] [--only lora,dora] [--exact]

Each result JSON of the suite (results/*.json: FLUX.2-klein-base-4B, NVIDIA L40S) holds the run's PEFT config
(run_info.peft_config), training config (run_info.train_config), library versions and its
train_info.accelerator_memory_max: torch.cuda.max_memory_reserved() over the training steps minus the reserved
bytes at start. Every run is estimated with `estimate_denoiser(..., program=peft_image_suite(train_config,
diffusers_version=<the run's>))` and compared; the table gives the run, method, measured and estimated reserved
GiB, the error, the estimated peak allocated GiB and the breakdown at that peak, then median / p90 absolute error.
Writes imagegen-estimates.jsonl and imagegen-estimates.md to --results, with the library versions used.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30

KLEIN_4B = dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
                axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=False)


# Runs whose estimate is outside 5 % of the measurement, and what is known about why (one line each in the .md).
OUTSIDE_5PCT = {
    "waveft/flux2-klein-default": (
        "cause not pinned down. The memory allocated after each step matches (7.69 GiB measured, `metrics[].mem "
        "allocated avg`, and estimated), and the estimate's two windows (11.04 and 11.09 GiB reserved) are within 2 % "
        "of the suite's six later windows (11.26); only the first 100 steps after the precompute held 0.8 GiB more "
        "reserved segments. Candidates, neither traced: what the precompute leaves in the allocator beyond the traced "
        "text-encoder and VAE passes (cuDNN work areas of the VAE's convolutions), and cuDNN's work area for WaveFT's "
        "wavelet reconstruction (peft/tuners/waveft/waverec2d.py conv_transpose2d, conv2d in its backward), whose size "
        "cuDNN's heuristics pick at run time; adding one or two outputs' size of work area to each of those "
        "convolutions does not close the gap (-8.4 %, -10.2 %)."),
}


def measured_windows(run: dict) -> list[int]:
    """Reserved bytes after each step, averaged per stretch of steps between evaluations (the suite logs
    memory_reserved() after every step): one value per window, the first after the precompute."""
    return [int(m["mem reserved avg"]) for m in run["train_info"].get("metrics", []) if "mem reserved avg" in m]


def klein_architecture():
    """FLUX.2-klein-base-4B (diffusers scripts/convert_flux2_to_diffusers.py, "klein-4b")."""
    from peftpick.types import Architecture, Denoiser

    return Architecture(
        name="flux2-klein-base-4b", model_type="flux2", hidden_size=3072, num_layers=25, num_heads=24,
        num_kv_heads=24, head_dim=128, intermediate_size=9216, vocab_size=0, tie_word_embeddings=False,
        hub_id="black-forest-labs/FLUX.2-klein-base-4B", config=KLEIN_4B,
        denoiser=Denoiser(family="flux2", diffusers_class="Flux2Transformer2DModel", objective="flow",
                          latent_channels=32, vae_scale=8, patch=2, text_dim=7680, text_len=512,
                          pipeline_class="Flux2KleinPipeline", default_resolution=1024),
    )


def peft_config_of(run: dict):
    import peft

    raw = run["run_info"].get("peft_config")
    if not raw:
        return None
    raw = {k: v for k, v in raw.items() if k not in ("auto_mapping", "base_model_name_or_path", "revision", "peft_version")}
    return peft.PeftConfig.from_peft_type(**raw)


def versions() -> dict[str, str]:
    import diffusers
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "diffusers": diffusers.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", type=Path, default=REPO.parent / "shared" / "peft-method-comparison" / "image-gen")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--only", default="", help="comma-separated substrings of run names")
    parser.add_argument("--exact", action="store_true", help="trace every block (no lengthening)")
    args = parser.parse_args(argv)

    from peftpick.errors import PeftpickError
    from peftpick.estimator.diffusion import estimate_denoiser, peft_image_suite
    from peftpick.types import TrainingShape

    arch = klein_architecture()
    files = sorted((args.suite / "results").glob("*.json"))
    if args.only:
        wanted = [w for w in args.only.split(",") if w]
        files = [f for f in files if any(w in f.stem for w in wanted)]
    rows = []
    print(f"{'run':<40} {'method':<16} {'measured':>9} {'estimate':>9} {'error':>8} {'alloc':>8} {'s':>5}  breakdown at the allocated peak (GiB)")
    for file in files:
        run = json.loads(file.read_text())
        train = run["run_info"]["train_config"]
        measured = run["train_info"]["accelerator_memory_max"]
        package = run["meta_info"]["package_info"]
        method = (run["run_info"].get("peft_config") or {}).get("peft_type", "full")
        if (run["run_info"].get("peft_config") or {}).get("use_dora"):
            method = "LORA+DoRA"
        row = {"run": run["run_info"]["experiment_name"], "method": method, "measured_reserved": measured,
               "gpu": run["meta_info"]["system_info"].get("accelerator"), "run_versions": {
                   k: package.get(f"{k}-version") for k in ("torch", "transformers", "peft", "diffusers")},
               "peft_commit": package.get("peft-commit-hash"), "measured_windows": measured_windows(run)}
        shape = TrainingShape(batch_size=int(train["batch_size"]), gradient_checkpointing=bool(train["use_gc"]),
                              dtype=train["dtype"], resolution=int(train["resolution"]))
        program = peft_image_suite(train, diffusers_version=package.get("diffusers-version"))
        start = time.perf_counter()
        try:
            est = estimate_denoiser(arch, peft_config_of(run), shape, exact=args.exact, program=program)
        except PeftpickError as error:
            row.update(error=str(error), seconds=round(time.perf_counter() - start, 2))
            rows.append(row)
            print(f"{row['run']:<40} {method:<16} {measured / GIB:9.3f} {'-':>9} {'-':>8} {'-':>8} {row['seconds']:5.1f}  not estimable: {error}")
            continue
        seconds = time.perf_counter() - start
        error = (est.peak_reserved_bytes - measured) / measured
        row.update(estimated_reserved=est.peak_reserved_bytes, estimated_allocated=est.peak_allocated_bytes,
                   error=round(error, 5), breakdown=est.breakdown, trainable=est.trainable_params,
                   measured_trainable=run["train_info"].get("num_trainable_params"), seconds=round(seconds, 2))
        rows.append(row)
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in est.breakdown.items() if v >= GIB / 200)
        print(f"{row['run']:<40} {method:<16} {measured / GIB:9.3f} {est.peak_reserved_bytes / GIB:9.3f} "
              f"{100 * error:+7.2f}% {est.peak_allocated_bytes / GIB:8.3f} {seconds:5.1f}  {parts}", flush=True)

    errors = [abs(r["error"]) for r in rows if isinstance(r.get("error"), float)]
    summary = {}
    if errors:
        errors.sort()
        p90 = errors[min(len(errors) - 1, int(round(0.9 * (len(errors) - 1))))]
        summary = {"runs": len(rows), "estimated": len(errors), "median_abs_error": statistics.median(errors),
                   "p90_abs_error": p90, "within_5pct": sum(e <= 0.05 for e in errors),
                   "seconds_median": statistics.median(r["seconds"] for r in rows if "estimated_reserved" in r)}
        print(f"\nmedian |error| {100 * summary['median_abs_error']:.2f} %, p90 {100 * p90:.2f} %, "
              f"{summary['within_5pct']}/{len(errors)} within 5 %, median {summary['seconds_median']:.1f} s per estimate")
    if not args.only:
        write(args.results, rows, summary, args.exact)
    return 0


def write(results: Path, rows: list[dict], summary: dict, exact: bool) -> None:
    results.mkdir(parents=True, exist_ok=True)
    used = versions()
    with (results / "imagegen-estimates.jsonl").open("w") as out:
        for row in rows:
            out.write(json.dumps({**row, "estimator_versions": used, "exact": exact}) + "\n")
    lines = [
        "# Denoiser memory estimate vs the PEFT image-generation suite",
        "",
        "`python benchmarks/compare_imagegen_estimates.py`: every run of huggingface/peft method_comparison/image-gen "
        "(FLUX.2-klein-base-4B, bf16, 512 px, batch 2, gradient checkpointing, NVIDIA L40S; results in "
        "`shared/peft-method-comparison/image-gen/results`), estimated with "
        f"torch {used['torch']}, transformers {used['transformers']}, peft {used['peft']}, diffusers {used['diffusers']} "
        "(the runs used torch 2.12/2.13, transformers 5.10-5.15, peft at commits b2d61f5 / 194cb8fe / a429b594, "
        "diffusers 0.38/0.39: the estimate applies the one known diffusers difference, see "
        "`estimator/diffusion_trace.py run_code_of`). Buffers that CUDA kernels allocate inside the call and the meta "
        "device does not make are added (cuFFT work areas, cuBLAS operand copies: `estimator/kernels.py "
        "cuda_temporaries`). Measured = `accelerator_memory_max` "
        "(max_memory_reserved over the training steps minus the reserved bytes at start).",
        "",
        "| run | method | measured GiB | estimated reserved GiB | error | estimated allocated GiB | s | breakdown at the allocated peak (GiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "estimated_reserved" not in r:
            lines.append(f"| {r['run']} | {r['method']} | {r['measured_reserved'] / GIB:.3f} | not estimable | | | | {r['error']} |")
            continue
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in r["breakdown"].items() if v >= GIB / 200)
        lines.append(f"| {r['run']} | {r['method']} | {r['measured_reserved'] / GIB:.3f} | "
                     f"{r['estimated_reserved'] / GIB:.3f} | {100 * r['error']:+.2f} % | "
                     f"{r['estimated_allocated'] / GIB:.3f} | {r['seconds']:.1f} | {parts} |")
    outside = [r for r in rows if isinstance(r.get("error"), float) and abs(r["error"]) > 0.05]
    if outside:
        lines += ["", "Runs outside 5 % (measured reserved per window between evaluations, GiB: "
                  "`metrics[].mem reserved avg`):", ""]
        for r in outside:
            windows = ", ".join(f"{w / GIB:.2f}" for w in r.get("measured_windows", []))
            reason = OUTSIDE_5PCT.get(r["run"], "cause not investigated")
            lines.append(f"- {r['run']} ({100 * r['error']:+.2f} %; windows {windows}): {reason}")
    if summary:
        skipped = summary["runs"] - summary["estimated"]
        lines += ["", f"Median absolute error {100 * summary['median_abs_error']:.2f} %, p90 "
                  f"{100 * summary['p90_abs_error']:.2f} %; {summary['within_5pct']} of {summary['estimated']} "
                  f"estimated runs within 5 % ({summary['runs']} runs, {skipped} not estimable); median "
                  f"{summary['seconds_median']:.1f} s per estimate (wall, 2-core machine).",
                  ""]
    (results / "imagegen-estimates.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
