"""Compare the memory estimator with peak memory measured on a GPU.

    python benchmarks/compare_estimates.py [--shared ../shared/gpu-measurements] [--results benchmarks/results]

Reads measurement rows (JSON lines: arch, method, batch, seq, grad_ckpt, peak_alloc, peak_reserved, and the GPU
and library versions) from the shared H100 runs and from this project's own results, estimates each row, and
prints the error per row, then median / p90 absolute error per method and per architecture, and the time taken.
Rows with an `error` field (runs that did not fit) are skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # measure_peaks, beside this script


def load_rows(shared: Path | None, results: Path | None) -> list[dict]:
    rows = []
    sources = []
    if shared and (shared / "h100-training-peaks.jsonl").is_file():
        sources.append((shared / "h100-training-peaks.jsonl", shared))
    if results and results.is_dir():
        sources += [(f, results) for f in sorted(results.glob("*peaks*.jsonl"))]
    for file, base in sources:
        for line in file.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if row.get("error") or not row.get("peak_alloc"):
                    continue
                row["_base"] = str(base)
                row["_file"] = file.name
                rows.append(row)
    return rows


def estimate_row(row: dict, exact: bool):
    from peftpick.estimator import estimate

    base = Path(row["_base"])
    model_dir = base / "models" / row["arch"]
    model = str(model_dir / "config.json") if model_dir.is_dir() else row["arch"]
    method = row["method"]
    optimizer = "adamw"
    if method.startswith("lorafa-"):
        method, optimizer = "lora-" + method.removeprefix("lorafa-"), "lora-fa"
    adapter_dir = base / "adapters" / method
    if adapter_dir.is_dir():
        adapter = str(adapter_dir / "adapter_config.json")
    else:  # rows measured by benchmarks/measure_peaks.py: the same method definitions
        from measure_peaks import peft_config
        from peftpick.knowledge.architectures import resolve_model

        adapter = peft_config(method, resolve_model(model)) or "full"
    # rows of measure_peaks.py --stacks carry their quantization, optimizer, loss kernel and loop
    return estimate(model, adapter, batch_size=row["batch"], seq_len=row["seq"],
                    gradient_checkpointing=bool(row["grad_ckpt"]), optimizer=row.get("optimizer", optimizer),
                    quant=row.get("quant", "none"), loss=row.get("loss", "stock"), trainer=row.get("trainer", "plain"),
                    exact=exact)


def summary(errors: list[float]) -> str:
    absolute = sorted(abs(e) for e in errors)
    p90 = absolute[min(len(absolute) - 1, int(round(0.9 * (len(absolute) - 1))))]
    return f"median {statistics.median(absolute):5.2f}%  p90 {p90:5.2f}%  (n={len(absolute)})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "gpu-measurements")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--exact", action="store_true", help="trace every layer instead of extrapolating")
    parser.add_argument("--arch", help="only rows of this architecture")
    parser.add_argument("--method", help="only rows of this method")
    parser.add_argument("--save", type=Path, help="also write each row's estimate and errors as JSON lines here")
    args = parser.parse_args(argv)

    import peft
    import torch
    import transformers

    installed = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    rows = [r for r in load_rows(args.shared, args.results)
            if (not args.arch or r["arch"] == args.arch) and (not args.method or r["method"] == args.method)]
    if not rows:
        print("no measurement rows found", file=sys.stderr)
        return 1
    measured = {(r.get("torch"), r.get("transformers"), r.get("peft")) for r in rows}
    print("estimator run with " + ", ".join(f"{k} {v}" for k, v in installed.items()))
    print("measurements made with " + "; ".join(f"torch {t}, transformers {tf}, peft {p}" for t, tf, p in sorted(measured, key=str)))
    if any(tf != installed["transformers"] or p != installed["peft"] for _, tf, p in measured):
        print("note: transformers / peft differ from the measurements; the estimate traces the installed versions "
              "(e.g. Gemma 2 runs sdpa in transformers 5.17 but eager attention from 5.2x), so compare with matching "
              "versions, see benchmarks/README.md")
    by = {"method": defaultdict(lambda: ([], [])), "arch": defaultdict(lambda: ([], [])), "gpu": defaultdict(lambda: ([], []))}
    all_alloc, all_res = [], []
    started = time.perf_counter()
    saved = []
    for row in rows:
        t0 = time.perf_counter()
        est = estimate_row(row, args.exact)
        e_alloc = 100 * (est.peak_allocated_bytes / row["peak_alloc"] - 1)
        e_res = 100 * (est.peak_reserved_bytes / row["peak_reserved"] - 1)
        all_alloc.append(e_alloc)
        all_res.append(e_res)
        saved.append({"arch": row["arch"], "method": row["method"], "batch": row["batch"], "seq": row["seq"],
                      "grad_ckpt": row["grad_ckpt"], "measured_on": row.get("gpu"), "measured_with": {
                          k: row.get(k) for k in ("torch", "transformers", "peft")}, "source": row["_file"],
                      "peak_alloc": row["peak_alloc"], "peak_reserved": row["peak_reserved"],
                      "est_peak_alloc": est.peak_allocated_bytes, "est_peak_reserved": est.peak_reserved_bytes,
                      "error_alloc_pct": round(e_alloc, 4), "error_reserved_pct": round(e_res, 4),
                      "estimated_with": installed})
        for key in by:
            value = row.get(key, row.get("gpu", "?"))
            by[key][value][0].append(e_alloc)
            by[key][value][1].append(e_res)
        print(f"{row['arch']:18s} {row['method']:14s} {row['batch']:>2d}x{row['seq']:<5d} ckpt={int(row['grad_ckpt'])} "
              f"allocated {est.peak_allocated_bytes / 2**30:7.2f} vs {row['peak_alloc'] / 2**30:7.2f} GiB ({e_alloc:+6.2f}%)  "
              f"reserved {est.peak_reserved_bytes / 2**30:7.2f} vs {row['peak_reserved'] / 2**30:7.2f} GiB ({e_res:+6.2f}%)  "
              f"[{time.perf_counter() - t0:.1f}s]", flush=True)
    elapsed = time.perf_counter() - started
    for key, groups in by.items():
        print(f"\nper {key}:")
        for value, (ea, er) in sorted(groups.items()):
            print(f"  {value:24s} allocated {summary(ea)}   reserved {summary(er)}")
    print(f"\nall rows: allocated {summary(all_alloc)}   reserved {summary(all_res)}")
    print(f"{len(rows)} estimates in {elapsed:.1f} s ({elapsed / len(rows):.2f} s each)")
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text("".join(json.dumps(r) + "\n" for r in saved))
        print(f"wrote {args.save}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
