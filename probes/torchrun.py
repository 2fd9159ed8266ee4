"""Probes on several GPUs: the candidate's micro-training under torchrun with FSDP2, one process per GPU.

The parent (`run_distributed`, called by the runner for a job with world_size > 1) starts
`python -m torch.distributed.run --standalone --nproc_per_node N -m peftpick.probes.torchrun JOB OUT` in its own
session. Every rank runs the worker's probe (probes.worker.run_job) with the model wrapped as accelerate's FSDP2
TRANSFORMER_BASED_WRAP wraps it (`fully_shard` on each decoder layer, then on the root) before the optimizer is
built, on its own GPU with NCCL, or on the CPU with gloo (how the tests run it), and writes OUT/rank-<r>.json,
also when it fails. A failing rank exits non-zero, and torchrun then stops the others; a rank stuck in a
collective gives up after COLLECTIVE_TIMEOUT_S, and the parent kills the whole session at its deadline. The result
is the busiest rank's peak, every rank's figures beside it.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from peftpick.errors import PeftpickError

COLLECTIVE_TIMEOUT_S = 120
START_ALLOWANCE_S = 120  # torchrun's rendezvous and every rank's imports, on top of the probe timeout


def check_gpus(gpus: Any, device: str) -> int:
    """`gpus` for a probe on `device` ("cuda..." or "cpu"): a whole number from 1 to the GPUs present (on the
    CPU, to the cores: that many gloo processes)."""
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise PeftpickError(f"--gpus must be a positive whole number, got {gpus!r}", "pass e.g. --gpus 2")
    if gpus == 1:
        return gpus
    if device.startswith("cuda"):
        import torch

        present = torch.cuda.device_count()
        if gpus > present:
            raise PeftpickError(f"--gpus {gpus} is more than the {present} CUDA GPU{'s' if present != 1 else ''} "
                                "of this machine", f"pass --gpus {present} or fewer")
        if ":" in device:
            raise PeftpickError(f"--device {device} names one GPU and --gpus {gpus} asks for several",
                                "pass --device cuda with --gpus (ranks take GPUs 0 to N-1)")
        return gpus
    cores = os.cpu_count() or 1
    if gpus > cores:
        raise PeftpickError(f"--gpus {gpus} on the CPU starts {gpus} processes, more than its {cores} cores",
                            f"pass --gpus {cores} or fewer, or probe on a machine with GPUs")
    return gpus


def run_distributed(job, folder: Path, timeout: float) -> tuple[dict[str, Any], float]:
    """Run `job` on job.world_size ranks; (the result message in the worker's form, wall seconds)."""
    number = len(list(folder.glob("dist-*")))
    work = folder / f"dist-{number}"
    work.mkdir()
    job_path = work / "job.pkl"
    with job_path.open("wb") as handle:
        pickle.dump(job, handle)
    log = work / "torchrun.log"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={job.world_size}",
               "-m", "peftpick.probes.torchrun", str(job_path), str(work)]
    began = time.time()
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)
        try:
            code = process.wait(timeout=timeout + START_ALLOWANCE_S)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill(process)
            code, timed_out = None, True
        except BaseException:
            _kill(process)
            raise
    ranks = {}
    for rank in range(job.world_size):
        path = work / f"rank-{rank}.json"
        if path.exists():
            ranks[rank] = json.loads(path.read_text())
    return combine(ranks, job.world_size, code, timed_out, timeout, _tail(log)), time.time() - began


def combine(ranks: dict[int, dict[str, Any]], world_size: int, code: int | None, timed_out: bool,
            timeout: float, log_tail: str = "") -> dict[str, Any]:
    """One result message from every rank's: the busiest rank's peaks; the first failure named by its rank."""
    backend = next((r.get("backend") for r in ranks.values() if r.get("backend")), "?")
    stopped = {rank for rank, r in ranks.items() if r.get("status") == "stopped"}  # by torchrun, not the cause
    failed = {rank: r for rank, r in ranks.items() if r.get("status") not in ("ok", "stopped")}
    oom = {rank: r for rank, r in failed.items() if r.get("status") == "oom"}
    missing = [rank for rank in range(world_size) if rank not in ranks]
    base = dict(ranks.get(0) or next(iter(ranks.values()), {}))
    base["ranks"] = [ranks.get(rank, {"rank": rank, "status": "no result"}) for rank in range(world_size)]
    # the cause first: an out-of-memory, then a rank that died without a word (the others then fail in their
    # collectives, which says nothing about the cause), then the first error
    if oom:
        rank, record = min(oom.items())
        base.update(status="oom", error=f"rank {rank}: {record.get('error')}")
    elif timed_out:
        base.update(status="error", error=f"timed out after {timeout:g} s on {world_size} ranks; every rank was "
                    "stopped")
    elif missing:
        words = "torchrun exit code " + str(code) if code is not None else "stopped"
        base.update(status="error", error=f"rank {missing[0]} wrote no result ({words}); last output: "
                    f"{log_tail or 'none'}")
    elif failed or stopped:
        rank, record = min(failed.items()) if failed else (min(stopped), ranks[min(stopped)])
        base.update(status="error", error=f"rank {rank}: {record.get('error')}")
    else:
        base["status"] = "ok"
        peaks = {rank: r.get("peak_reserved") or 0 for rank, r in ranks.items()}
        for key in ("peak_allocated", "peak_reserved", "nvml_used"):
            values = [r.get(key) for r in ranks.values() if r.get(key) is not None]
            base[key] = max(values) if values else None
        if any(peaks.values()):  # memory is measured on GPUs only
            base["busiest_rank"] = max(peaks, key=peaks.get)
        # every rank trains on its own micro-batch: the run's throughput is theirs together, its step the slowest
        base["tokens_per_second"] = sum(r.get("tokens_per_second") or 0 for r in ranks.values()) or None
        base["step_seconds"] = max((r.get("step_seconds") or 0 for r in ranks.values()), default=None) or None
    base["notes"] = [f"{world_size} ranks, {backend}, FSDP2 (fully_shard per decoder layer and the root)"
                     + (f"; busiest rank {base['busiest_rank']}" if "busiest_rank" in base else "")]
    return base


def _kill(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _tail(log: Path, lines: int = 6) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


# ------------------------------------------------------------------------------------------ one rank


def _rank_main(job_path: str, out: str) -> int:
    import dataclasses

    import torch
    import torch.distributed as dist

    from peftpick.probes.worker import run_job

    with open(job_path, "rb") as handle:
        job = pickle.load(handle)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    cuda = job.device.startswith("cuda")
    backend = "nccl" if cuda else "gloo"
    record: dict[str, Any] = {"rank": rank, "backend": backend, "status": "error"}
    result = Path(out, f"rank-{rank}.json")

    def stopped(_signum, _frame) -> None:
        # torchrun stops the other ranks when one fails: say so, so the one that failed is the one named
        result.write_text(json.dumps({**record, "status": "stopped", "error": "stopped by torchrun"}))
        os._exit(1)

    signal.signal(signal.SIGTERM, stopped)
    try:
        if cuda:
            job = dataclasses.replace(job, device=f"cuda:{local_rank}")
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        record.update(run_job(job, lambda **_event: None, wrap=_fully_shard))
        record["rank"] = rank
    except Exception as error:  # noqa: BLE001 - what stopped this rank goes into its file
        record["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        result.write_text(json.dumps(record))
    if record.get("status") == "ok":
        dist.destroy_process_group()
        return 0
    return 1


def _fully_shard(model):
    """FSDP2 as accelerate's TRANSFORMER_BASED_WRAP applies it: each decoder layer, then the root."""
    from torch.distributed.fsdp import fully_shard

    from peftpick.estimator.training import decoder_layers

    layers = decoder_layers(model)
    for layer in layers or ():
        fully_shard(layer)
    fully_shard(model)
    return model


if __name__ == "__main__":
    sys.exit(_rank_main(*sys.argv[1:3]))
