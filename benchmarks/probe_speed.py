"""How long `peftpick probe` takes, start-up included, and where the time goes (needs a CUDA GPU for the real figure).

    python benchmarks/probe_speed.py                 # 8 candidates, Llama-3.2-3B random weights, 4 x 768, 10 steps
    python benchmarks/probe_speed.py --model smollm2-135m --device cpu --seq-len 64 --batch-size 1 --steps 2 \\
        --methods lora,ia3                           # CPU dry run: checks the script end to end, times nothing useful

Runs the real command line, as a user would, in a subprocess timed from the outside:

    peftpick probe --model llama-3.2-3b --random-weights --no-cache --json [--methods ...] [--steps ...] ...

so the total includes the interpreter's start-up, the CLI's imports, the data and every worker process. It parses
the JSON the command prints and splits the time with each result's `phase_seconds`:

    waiting   the job was handed over before the worker had finished importing torch / transformers / peft
              (worker start-up that was not hidden behind the previous probe)
    cuda      creating the CUDA context          load     building the model, the adapter and the optimizer
    warm-up   the first optimizer step           steps    the measured optimizer steps
    exit      the worker's exit                  other    the rest of the probe's wall time (job hand-over, events)
    import    the worker's whole import time; it runs ahead of need, overlapping the previous probe, so only its
              `waiting` part is on the critical path (not added to the total)

and `total - sum of the probes' wall times` is the parent's own overhead (CLI start-up and imports, resolving the
model, loading and tokenizing the data while the first worker imports, printing the JSON).

Target: <= 45 s for the default eight candidates (peftpick.probes.DEFAULT_METHODS) on Llama-3.2-3B with random
weights, batch 4 x 768, 10 steps, on one H100. Writes one JSON document (GPU name, library versions, per-candidate
and total timings) to benchmarks/results/<gpu>-probe-speed.json, or to --save. A CPU run is labelled a dry run and
writes nothing unless --save is given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TARGET_SECONDS = 45.0
TARGET_SETTING = {"model": "llama-3.2-3b", "batch_size": 4, "seq_len": 768, "steps": 10}
GIB = 2**30

# (phase key in ProbeResult.phase_seconds, column header); the critical-path phases of one probe's wall time
PHASES = [("waiting_for_worker", "waiting"), ("cuda_init", "cuda"), ("load", "load"), ("warmup", "warm-up"),
          ("steps", "steps"), ("worker_exit", "exit")]
OVERLAPPED = "worker_import"


# ------------------------------------------------------------------------------------------- shared helpers
# (probe_vs_reference.py imports these)


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (as measure_peaks.py names its files)."""
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-") or "unknown-gpu"


def parent_versions() -> dict[str, str]:
    """Installed versions in this environment, read without importing the libraries."""
    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "peftpick", "nvidia-ml-py", "accelerate"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def gpu_facts(index: int = 0) -> dict[str, Any]:
    """The GPU's name, memory and driver through NVML (no CUDA context is created); {} without a GPU."""
    from peftpick.probes.device import detect_gpu

    gpu = detect_gpu(index)
    if gpu is None:
        return {}
    facts: dict[str, Any] = {"gpu": gpu.name, "gpu_memory_bytes": gpu.total_bytes}
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            driver = pynvml.nvmlSystemGetDriverVersion()
            facts["driver"] = driver.decode() if isinstance(driver, bytes) else driver
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        pass
    return facts


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_index(device: str | None) -> int:
    if device and ":" in device:
        return int(device.split(":", 1)[1])
    return 0


def wants_cpu(device: str | None) -> bool:
    return (device or "").strip().lower() == "cpu"


def peftpick_command() -> list[str]:
    """The `peftpick` script of this environment (what a user runs), else `python -m peftpick.cli`."""
    script = Path(sys.executable).parent / "peftpick"
    if script.is_file():
        return [str(script)]
    found = shutil.which("peftpick")
    return [found] if found else [sys.executable, "-m", "peftpick.cli"]


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def gib(n_bytes: int | None) -> str:
    return "-" if n_bytes is None else f"{n_bytes / GIB:.2f}"


# ------------------------------------------------------------------------------------------- the benchmark


def timed(command: list[str]) -> float | None:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    return time.perf_counter() - started if done.returncode == 0 else None


def cli_command(args: argparse.Namespace) -> list[str]:
    command = [*peftpick_command(), "probe", "--model", args.model, "--random-weights", "--no-cache", "--json",
               "--methods", args.methods, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--seq-len", str(args.seq_len)]
    if args.device:
        command += ["--device", args.device]
    if args.timeout:
        command += ["--timeout", str(args.timeout)]
    return command


def run_timed(command: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    """Run `command`, timing it from the outside: the interpreter's start-up and every import are included."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    return time.perf_counter() - started, done


def candidate_row(result: dict[str, Any]) -> dict[str, Any]:
    phases = {key: float(value) for key, value in (result.get("phase_seconds") or {}).items()}
    wall = result.get("wall_seconds")
    critical = sum(phases.get(key, 0.0) for key, _ in PHASES)
    return {
        "method": result.get("method"),
        "display_name": result.get("display_name") or result.get("method"),
        "status": result.get("status"),
        "error": result.get("error"),
        "from_cache": result.get("from_cache", False),
        "shape": result.get("shape"),
        "wall_seconds": wall,
        "phase_seconds": phases,
        "other_seconds": None if wall is None else max(0.0, wall - critical),
        "tokens_per_second": result.get("tokens_per_second"),
        "step_seconds": result.get("step_seconds"),
        "peak_allocated_bytes": result.get("peak_allocated_bytes"),
        "peak_reserved_bytes": result.get("peak_reserved_bytes"),
        "nvml_used_bytes": result.get("nvml_used_bytes"),
        "device": result.get("device"),
    }


def fmt(value: float | None, width: int = 7, digits: int = 1) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def print_report(rows: list[dict[str, Any]], total: float, dry_run: bool, label: str) -> dict[str, Any]:
    headers = ["wall", *[header for _, header in PHASES], "other", "import*"]
    memory = any(row["peak_allocated_bytes"] is not None for row in rows)
    print(f"\n{label}")
    line = f"{'candidate':<16} {'status':<7} " + " ".join(f"{h:>7}" for h in headers) + f" {'tok/s':>8}"
    if memory:
        line += f" {'alloc GiB':>10} {'resv GiB':>9}"
    print(line)
    print("-" * len(line))
    sums: dict[str, float] = {}
    for row in rows:
        phases = row["phase_seconds"]
        values = [row["wall_seconds"], *[phases.get(key) for key, _ in PHASES], row["other_seconds"],
                  phases.get(OVERLAPPED)]
        for header, value in zip(headers, values):
            if value is not None:
                sums[header] = sums.get(header, 0.0) + value
        text = f"{row['display_name'][:16]:<16} {str(row['status'])[:7]:<7} " + " ".join(fmt(v) for v in values)
        text += f" {fmt(row['tokens_per_second'], 8, 0)}"
        if memory:
            text += f" {gib(row['peak_allocated_bytes']):>10} {gib(row['peak_reserved_bytes']):>9}"
        print(text)
    print("-" * len(line))
    print(f"{'sum of probes':<24} " + " ".join(fmt(sums.get(h)) for h in headers))
    print("seconds; import* = the worker's import time, overlapped with the previous probe (only 'waiting' is on "
          "the critical path)")
    for row in rows:
        if row["status"] != "ok":
            print(f"  {row['display_name']}: {row['status']}: {row['error']}")

    probes = sums.get("wall", 0.0)
    parent = total - probes
    print(f"\nTotal wall time of the command, start-up included: {total:.1f} s"
          + ("  (CPU dry run: not a GPU figure)" if dry_run else ""))
    print(f"  probes (sum of their wall times):  {probes:6.1f} s  ({100 * probes / total:4.1f} %)")
    for key, header in PHASES:
        if header in sums:
            print(f"    {header:<31} {sums[header]:6.1f} s  ({100 * sums[header] / total:4.1f} %)")
    if "other" in sums:
        print(f"    {'other (hand-over, events)':<31} {sums['other']:6.1f} s  ({100 * sums['other'] / total:4.1f} %)")
    print(f"  parent overhead (total - probes):  {parent:6.1f} s  ({100 * parent / total:4.1f} %): CLI start-up and "
          "imports, model resolution, data loading and tokenizing, JSON output")
    return {"sum_probe_wall_seconds": round(probes, 3), "parent_overhead_seconds": round(parent, 3),
            "phase_totals_seconds": {h: round(v, 3) for h, v in sums.items()}}


def main(argv: list[str] | None = None) -> int:
    from peftpick.probes import DEFAULT_METHODS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=TARGET_SETTING["model"], help="bundled name, folder or hub id")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated (default: the eight "
                        "of peftpick.probes.DEFAULT_METHODS)")
    parser.add_argument("--steps", type=int, default=TARGET_SETTING["steps"], help="measured steps per probe")
    parser.add_argument("--batch-size", type=int, default=TARGET_SETTING["batch_size"])
    parser.add_argument("--seq-len", type=int, default=TARGET_SETTING["seq_len"])
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: the GPU; cpu makes it a dry run)")
    parser.add_argument("--timeout", type=float, help="passed to `peftpick probe --timeout` (seconds per probe)")
    parser.add_argument("--save", type=Path, help="JSON file to write (default on a GPU: "
                        "benchmarks/results/<gpu>-probe-speed.json; on the CPU: nothing)")
    args = parser.parse_args(argv)
    args.methods = ",".join(name.strip() for name in args.methods.split(",") if name.strip())

    dry_run = wants_cpu(args.device)
    facts = {} if dry_run else gpu_facts(device_index(args.device))
    if not dry_run and not facts:
        print("probe_speed.py needs a CUDA GPU (none found through NVML). For a CPU dry run of the script pass "
              "--device cpu with a small model, e.g. --model smollm2-135m --device cpu --seq-len 64 --batch-size 1 "
              "--steps 2 --methods lora,ia3", file=sys.stderr)
        return 1
    label = ("CPU DRY RUN (no GPU: times the script end to end, not the GPU target)" if dry_run
             else f"GPU run on {facts['gpu']}")
    print(f"{label}\nprobing {args.methods} on {args.model} (random weights), batch {args.batch_size} x "
          f"{args.seq_len}, {args.steps} steps + 1 warm-up, cache disabled", flush=True)

    command = cli_command(args)
    shown = ["peftpick", *command[len(peftpick_command()):]]
    print("$ " + " ".join(shown), flush=True)
    total, done = run_timed(command)
    try:  # the document starts at the first line that opens a JSON object (a library might print before it)
        start = 0 if done.stdout.startswith("{") else done.stdout.index("\n{") + 1
        document, _ = json.JSONDecoder().raw_decode(done.stdout[start:])
    except ValueError:  # no JSON at all (json.JSONDecodeError is a ValueError too)
        print(f"`peftpick probe` exited with {done.returncode} and printed no JSON after {total:.1f} s",
              file=sys.stderr)
        print(done.stderr.strip()[-3000:], file=sys.stderr)
        return 1
    if done.stderr.strip():
        print("stderr of the command: " + " | ".join(done.stderr.strip().splitlines()[-5:]))
    rows = [candidate_row(result) for result in document.get("results", [])]
    devices = sorted({row["device"] for row in rows if row["device"] and row["device"] != "not run"})
    dry_run = dry_run or devices == ["cpu"]
    gpu = facts.get("gpu") or next((d for d in devices if d != "cpu"), None)
    label = "CPU DRY RUN" if dry_run else f"measured on {gpu}"
    summary = print_report(rows, total, dry_run, f"Probe timings ({label})")

    # Indicative shares of the parent overhead, measured afterwards (so they do not warm the disk cache first).
    # The parent imports peft (and with it torch and transformers) while building the candidates.
    startup = {"peftpick --version": timed([*peftpick_command(), "--version"]),
               "python -c 'import peft'": timed([sys.executable, "-c", "import peft"])}
    print("  measured afterwards, for scale: " + ", ".join(
        f"`{name}` {'failed' if seconds is None else f'{seconds:.1f} s'}" for name, seconds in startup.items()))

    methods = args.methods.split(",")
    target_setting = (not dry_run and args.model == TARGET_SETTING["model"] and args.batch_size == 4
                      and args.seq_len == 768 and args.steps == 10 and sorted(methods) == sorted(DEFAULT_METHODS))
    ok = all(row["status"] == "ok" for row in rows) and done.returncode == 0 and not document.get("interrupted")
    target_met = (total <= TARGET_SECONDS and ok) if target_setting else None
    if target_setting:
        print(f"\nTarget <= {TARGET_SECONDS:.0f} s for the eight candidates: {'met' if target_met else 'MISSED'} "
              f"({total:.1f} s on {gpu}" + ("" if ok else "; not every probe succeeded") + ")")
    else:
        print(f"\nTarget <= {TARGET_SECONDS:.0f} s applies to the default eight candidates on llama-3.2-3b, 4 x 768, "
              "10 steps, on a GPU; not this setting" + (" (CPU dry run)" if dry_run else ""))

    worker_versions = next((result.get("versions") for result in document.get("results", [])
                            if result.get("versions")), {})
    record = {
        "benchmark": "probe_speed",
        "dry_run": dry_run,
        "measured_at": now_iso(),
        "gpu": None if dry_run else gpu,
        "device": "cpu" if dry_run else gpu,
        "cpu": cpu_name(),
        "gpu_facts": facts,
        "versions": {"worker": worker_versions, "parent": parent_versions()},
        "command": shown,
        "cli_exit_code": done.returncode,
        "interrupted": document.get("interrupted"),
        "setting": {"model": args.model, "methods": methods, "batch_size": args.batch_size, "seq_len": args.seq_len,
                    "steps": args.steps, "warmup_steps": 1, "random_weights": True, "cache": False},
        "total_seconds": round(total, 3),
        **summary,
        "startup_measured_afterwards_seconds": startup,
        "target_seconds": TARGET_SECONDS if target_setting else None,
        "target_met": target_met,
        "candidates": rows,
    }
    save = args.save or (None if dry_run else RESULTS / f"{gpu_slug(gpu or 'unknown-gpu')}-probe-speed.json")
    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        save.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {save}")
    else:
        print("CPU dry run: nothing written (pass --save PATH to keep the JSON)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
