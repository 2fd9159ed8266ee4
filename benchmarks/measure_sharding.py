"""Measure the per-rank peak memory of each multi-GPU strategy under torchrun, beside peftpick's per-GPU estimate.

    python benchmarks/measure_sharding.py --model llama-3.2-3b --gpus 4          # needs 4 CUDA GPUs
    python benchmarks/measure_sharding.py --model llama-3.2-3b --gpus 8 --strategies fsdp2,zero3 --method full
    python benchmarks/measure_sharding.py --model tiny.json --gpus 2 --device cpu  # a dry run with gloo (no memory)

For each strategy, `torchrun --standalone --nproc_per_node N` starts this file in rank mode: every rank builds
the model from its config with random weights in bf16 (memory does not depend on the values), adds the adapter
(LoRA r=16 on q_proj, v_proj, or full fine-tuning), wraps it as the strategy does (DDP; fully_shard on each decoder
layer and the root, with CPUOffloadPolicy for fsdp2-offload; deepspeed.initialize with the config peftpick
emits for zero*), trains three steps of micro-batch --batch-size at --seq-len with AdamW (DeepSpeed: its
optimizer from the config), and reports torch.cuda.max_memory_allocated / max_memory_reserved. The busiest
rank's peak is written beside `estimator.sharding.per_gpu`'s figure, one JSON line per strategy, with the GPU
name and library versions, to --out (default benchmarks/results/sharding-<gpu>.jsonl). No figure of this file
has been measured yet: no multi-GPU machine was lent to this project.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STRATEGIES = ("ddp", "fsdp2", "fsdp2-offload", "zero2", "zero3", "zero3-offload")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-3.2-3b", help="bundled name, config.json or folder")
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--method", choices=("lora", "full"), default="lora")
    parser.add_argument("--batch-size", type=int, default=1, help="micro-batch per GPU")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rank-worker", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_worker:
        return _rank(*args.rank_worker)
    return _driver(args)


def _driver(args) -> int:
    from peftpick.estimator import estimate
    from peftpick.estimator.sharding import per_gpu
    from peftpick.knowledge.architectures import resolve_model
    from peftpick.report.launch import launch_for  # noqa: F401  (the DeepSpeed config comes from the same code)
    from peftpick.types import Strategy

    arch = resolve_model(args.model)
    single = estimate(args.model, "full" if args.method == "full" else "lora", batch_size=args.batch_size,
                      seq_len=args.seq_len, rank=None if args.method == "full" else 16)
    rows = []
    for name in [s.strip() for s in args.strategies.split(",") if s.strip()]:
        strategy = Strategy(name)
        if args.device == "cpu" and (name.endswith("offload") or name.startswith("zero")):
            print(f"{name:14s} skipped: CPU offload and DeepSpeed need a GPU")
            continue
        expected = per_gpu(single, arch, args.gpus, strategy)
        with tempfile.TemporaryDirectory(prefix="peftpick-sharding-") as folder:
            job = Path(folder) / "job.json"
            job.write_text(json.dumps({"config": arch.config, "strategy": name, "method": args.method,
                                       "batch_size": args.batch_size, "seq_len": args.seq_len,
                                       "device": args.device, "hidden_size": arch.hidden_size}))
            began = time.time()
            done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   f"--nproc_per_node={args.gpus}", __file__, "--rank-worker", str(job), folder],
                                  capture_output=True, text=True, timeout=1800)
            ranks = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("rank-*.json"))]
        busiest = max(ranks, key=lambda r: r.get("peak_reserved") or 0) if ranks else {}
        row = {"model": args.model, "method": args.method, "strategy": name, "gpus": args.gpus,
               "batch_size": args.batch_size, "seq_len": args.seq_len, "exit_code": done.returncode,
               "wall_seconds": round(time.time() - began, 1), "ranks": ranks,
               "measured_peak_reserved": busiest.get("peak_reserved"),
               "measured_peak_allocated": busiest.get("peak_allocated"),
               "estimated_peak_reserved": expected.peak_reserved_bytes,
               "estimated_peak_allocated": expected.peak_allocated_bytes,
               "gpu": busiest.get("gpu"), "versions": busiest.get("versions"),
               "error": None if done.returncode == 0 else done.stderr[-2000:]}
        if row["measured_peak_reserved"]:
            row["estimate_over_measured"] = round(expected.peak_reserved_bytes / row["measured_peak_reserved"], 4)
        rows.append(row)
        print(f"{name:14s} exit {done.returncode}  measured {_gib(row['measured_peak_reserved'])}  "
              f"estimated {_gib(row['estimated_peak_reserved'])} GiB reserved (busiest rank)", flush=True)
    gpu = next((r["gpu"] for r in rows if r.get("gpu")), args.device)
    out = args.out or Path(__file__).parent / "results" / f"sharding-{str(gpu).replace(' ', '-').lower()}.jsonl"
    with out.open("a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    print(f"written to {out}")
    return 0 if all(r["exit_code"] == 0 for r in rows) else 1


def _gib(value) -> str:
    return "-" if not value else f"{value / 2**30:.2f}"


def _rank(job_path: str, out: str) -> int:
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM

    job = json.loads(Path(job_path).read_text())
    cuda = job["device"] == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, local = dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    record = {"rank": rank, "gpu": torch.cuda.get_device_name(device) if cuda else "cpu",
              "versions": {"torch": torch.__version__}}
    try:
        config = AutoConfig.for_model(**{k: v for k, v in job["config"].items() if k != "transformers_version"})
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        if job["method"] == "full":
            model.requires_grad_(True)
        else:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                                     task_type="CAUSAL_LM"))
        model, optimizer = _wrap(model, job, device)
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(3):
            x = torch.randint(0, config.vocab_size, (job["batch_size"], job["seq_len"]), device=device)
            loss = model(input_ids=x, labels=x).loss
            if hasattr(model, "backward") and job["strategy"].startswith("zero"):
                model.backward(loss)
                model.step()
            else:
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
            record.update(peak_allocated=torch.cuda.max_memory_allocated(device),
                          peak_reserved=torch.cuda.max_memory_reserved(device))
        record["status"] = "ok"
    except Exception as error:  # noqa: BLE001 - every rank reports what stopped it
        record.update(status="error", error=f"{type(error).__name__}: {str(error).splitlines()[0][:300]}")
    finally:
        Path(out, f"rank-{rank}.json").write_text(json.dumps(record))
    return 0 if record["status"] == "ok" else 1


def _wrap(model, job, device):
    import torch

    strategy = job["strategy"]
    trainable = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        return model, torch.optim.AdamW(trainable(model), lr=1e-4, weight_decay=0.1)
    if strategy.startswith("fsdp2"):
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        policy = {"offload_policy": CPUOffloadPolicy()} if strategy.endswith("offload") else {}
        layers = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
        for layer in layers:
            fully_shard(layer, **policy)
        fully_shard(model, **policy)
        return model, torch.optim.AdamW(trainable(model), lr=1e-4, weight_decay=0.1)
    import deepspeed

    from peftpick.estimator.sharding import zero_buckets
    from peftpick.types import Architecture

    buckets = zero_buckets(Architecture("model", "", job["hidden_size"], 0, 0, 0, 0, 0, 0, False))
    stage3 = strategy.startswith("zero3")
    zero = {"stage": 3 if stage3 else 2, "reduce_bucket_size": buckets["reduce_bucket_size"]}
    if stage3:
        zero.update(stage3_prefetch_bucket_size=buckets["stage3_prefetch_bucket_size"],
                    stage3_param_persistence_threshold=buckets["stage3_param_persistence_threshold"])
    if strategy.endswith("offload"):
        zero["offload_optimizer"] = {"device": "cpu"}
        zero["offload_param"] = {"device": "cpu"}
    config = {"bf16": {"enabled": True}, "zero_optimization": zero, "train_micro_batch_size_per_gpu": job["batch_size"],
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.1}}}
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=trainable(model), config=config)
    return engine, optimizer


if __name__ == "__main__":
    sys.exit(main())
