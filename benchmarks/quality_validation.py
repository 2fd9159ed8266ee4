"""Leave-one-run-out validation of the expected-quality model (peftpick.recommender.quality).

    python benchmarks/quality_validation.py [--jobs 2] [--compare-pooled]

For each benchmark (MetaMathQA on Llama-3.2-3B, image-gen on FLUX.2-klein) and each feature set (static: method
family, parameter budget, targeted roles, learning rate; early: static plus early train loss and its fall, both
relative to plain LoRA), every run is held out in turn, a `QualityModel` is fit on the others and predicts the
held-out run's score relative to plain LoRA with an 80 % interval. Printed as markdown tables:

- MAE in relative-to-LoRA units and in score points (accuracy points / DINO similarity x 100), next to a constant
  baseline (the mean of the other runs); Spearman rank correlation between predicted and actual;
- interval coverage (share of held-out runs inside their interval), overall and for runs at >= 0.9x LoRA and
  below, with the median interval width;
- Spearman among the top group (the 21 MetaMathQA PEFT runs at >= 45 % accuracy), for the model and for the
  raw early-loss signal alone: what early signals can and cannot order;
- the held-out runs predicted worst.

`--compare-pooled` adds the comparison that chose one model per benchmark over one pooled model with a benchmark
indicator (slower). Deterministic: fixed seeds, results independent of --jobs.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from scipy.stats import spearmanr
from sklearn.ensemble import RandomForestRegressor

BENCHMARKS = ("MetaMathQA", "image-gen")
FEATURE_SETS = ("static", "early")
INTERVAL = 0.8
TOP_GROUP_ACCURACY = 0.45  # knowledge-facts §(e): the 21 MetaMathQA PEFT runs at or above 45 % test accuracy
GOOD_RELATIVE = 0.9  # "near LoRA or better", to split coverage into strong and weak runs
WORST_SHOWN = 5


@dataclass(frozen=True)
class HeldOut:
    experiment: str
    actual: float  # relative to LoRA
    predicted: float
    low: float
    high: float


def held_out_predictions(runs: pd.DataFrame, benchmark: str, features: str, experiments: list[str]) -> list[HeldOut]:
    """Fit without each of `experiments` in turn (LoRA's run stays the unit of 1.0) and predict it."""
    from peftpick.knowledge.benchmarks import LORA_REFERENCE
    from peftpick.recommender.quality import QualityModel, features_of_run

    reference = runs[runs["experiment"] == LORA_REFERENCE[benchmark]].iloc[0]
    held = []
    for experiment in experiments:
        row = runs[runs["experiment"] == experiment].iloc[0]
        model = QualityModel(features=features, benchmark=benchmark, interval=INTERVAL, random_state=0)
        model.fit(runs[runs["experiment"] != experiment], reference=reference)
        features_row = [features_of_run(row, reference)]
        low, high = model.predict_interval(features_row)
        held.append(HeldOut(experiment, float(row["score"]) / float(reference["score"]),
                            float(model.predict(features_row)[0]), float(low[0]), float(high[0])))
    return held


def leave_one_run_out(frame: pd.DataFrame, benchmark: str, features: str, jobs: int) -> list[HeldOut]:
    runs = frame[frame["benchmark"] == benchmark].reset_index(drop=True)
    experiments = list(runs["experiment"])
    chunks = [experiments[start::jobs] for start in range(jobs)]  # one task per process: the runs travel once
    results = Parallel(n_jobs=jobs)(delayed(held_out_predictions)(runs, benchmark, features, chunk) for chunk in chunks)
    by_experiment = {h.experiment: h for chunk in results for h in chunk}
    return [by_experiment[experiment] for experiment in experiments]


def spearman(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    result = spearmanr(a, b)
    return float(result.statistic), float(result.pvalue)


def constant_baseline_mae(actual: np.ndarray) -> float:
    """MAE of predicting each held-out run by the mean of the others."""
    others_mean = (actual.sum() - actual) / (len(actual) - 1)
    return float(np.mean(np.abs(actual - others_mean)))


def top_group_mask(frame: pd.DataFrame, benchmark: str, experiments: list[str]) -> np.ndarray | None:
    if benchmark != "MetaMathQA":
        return None
    rows = frame.set_index("experiment").loc[experiments]
    return ((rows["score"] >= TOP_GROUP_ACCURACY) & (rows["peft_type"] != "FULL_FINETUNING")).to_numpy()


def fmt_rho(rho: float, p: float, n: int) -> str:
    return f"{rho:+.2f} (p={p:.2g}, n={n})"


def report(frame: pd.DataFrame, jobs: int) -> None:
    from peftpick.knowledge.benchmarks import LORA_REFERENCE
    from peftpick.recommender.quality import EARLY_WINDOWS, run_features

    print(f"## Leave-one-run-out validation of the expected-quality model ({INTERVAL:.0%} intervals)\n")
    print("| benchmark | features | runs | MAE (x LoRA) | MAE (points) | constant baseline MAE (x LoRA / points) "
          "| Spearman (all runs) | coverage all / >=0.9x / <0.9x | median width (x LoRA) | Spearman, top group |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    worst: dict[tuple[str, str], list[HeldOut]] = {}
    signals: list[str] = []
    for benchmark in BENCHMARKS:
        runs = frame[frame["benchmark"] == benchmark]
        reference = runs[runs["experiment"] == LORA_REFERENCE[benchmark]].iloc[0]
        points = 100 * float(reference["score"])  # one relative unit in score points
        for features in FEATURE_SETS:
            held = leave_one_run_out(frame, benchmark, features, jobs)
            actual = np.array([h.actual for h in held])
            predicted = np.array([h.predicted for h in held])
            inside = np.array([h.low <= h.actual <= h.high for h in held])
            width = np.array([h.high - h.low for h in held])
            good = actual >= GOOD_RELATIVE
            mae = float(np.mean(np.abs(predicted - actual)))
            baseline = constant_baseline_mae(actual)
            rho, p = spearman(predicted, actual)
            top = top_group_mask(frame, benchmark, [h.experiment for h in held])
            top_text = "n/a (no accuracy threshold)" if top is None else fmt_rho(*spearman(predicted[top], actual[top]),
                                                                                  int(top.sum()))
            print(f"| {benchmark} | {features} | {len(held)} | {mae:.3f} | {mae * points:.2f} | "
                  f"{baseline:.3f} / {baseline * points:.2f} | {fmt_rho(rho, p, len(held))} | "
                  f"{inside.mean():.0%} / {inside[good].mean():.0%} (n={int(good.sum())}) / "
                  f"{inside[~good].mean():.0%} (n={int((~good).sum())}) | {np.median(width):.3f} | {top_text} |")
            worst[(benchmark, features)] = sorted(held, key=lambda h: -abs(h.predicted - h.actual))[:WORST_SHOWN]

        # The raw signal the early features come from, with no model: loss in the second early window over LoRA's.
        features_table = run_features(runs, reference)
        signal = -features_table["early_loss_ratio"].to_numpy(dtype=float)
        actual = runs["score"].to_numpy(dtype=float) / float(reference["score"])
        rho, p = spearman(signal, actual)
        top = top_group_mask(frame, benchmark, list(runs["experiment"]))
        top_text = "n/a" if top is None else fmt_rho(*spearman(signal[top], actual[top]), int(top.sum()))
        step = EARLY_WINDOWS[benchmark][1]
        signals.append(f"| {benchmark} | train loss at step {step} / LoRA's (lower is better) | "
                       f"{fmt_rho(rho, p, len(runs))} | {top_text} |")

    print("\nTop group: MetaMathQA PEFT runs with test accuracy >= 45 % (full fine-tuning excluded), as in "
          "knowledge-facts §(e). Points: test accuracy points (MetaMathQA) or DINO similarity x 100 (image-gen).")
    print("\n## The early signal alone (no model), for comparison\n")
    print("| benchmark | signal | Spearman (all runs) | Spearman, top group |")
    print("|---|---|---|---|")
    print("\n".join(signals))

    print("\n## Held-out runs predicted worst\n")
    print("| benchmark | features | run | actual (x LoRA) | predicted | interval |")
    print("|---|---|---|---|---|---|")
    for (benchmark, features), rows in worst.items():
        for h in rows:
            print(f"| {benchmark} | {features} | {h.experiment} | {h.actual:.3f} | {h.predicted:.3f} | "
                  f"{h.low:.2f}-{h.high:.2f} |")


def compare_pooled(frame: pd.DataFrame, jobs: int) -> None:
    """Leave-one-run-out MAE / Spearman of one model per benchmark against one pooled model with an indicator."""
    from peftpick.knowledge.benchmarks import LORA_REFERENCE
    from peftpick.recommender.quality import FAMILIES, FEATURE_SETS as SETS, QualityModel, run_features

    tables = []
    for benchmark in BENCHMARKS:
        runs = frame[frame["benchmark"] == benchmark]
        reference = runs[runs["experiment"] == LORA_REFERENCE[benchmark]].iloc[0]
        table = run_features(runs, reference)
        table["relative"] = runs["score"].astype(float) / float(reference["score"])
        table["image_gen"] = float(benchmark == "image-gen")
        table["benchmark"] = benchmark
        tables.append(table)
    table = pd.concat(tables, ignore_index=True)
    defaults = QualityModel().get_params()
    forest_params = {name: defaults[name] for name in ("n_estimators", "min_samples_leaf", "max_features",
                                                        "random_state")}

    def matrix(rows: pd.DataFrame, names: tuple[str, ...], pooled: bool) -> np.ndarray:
        families = np.stack([(rows["family"] == family).to_numpy(float) for family in FAMILIES], axis=1)
        numeric = rows[[name for name in names if name != "family"]].to_numpy(float)
        extra = rows[["image_gen"]].to_numpy(float) if pooled else np.empty((len(rows), 0))
        return np.concatenate([families, numeric, extra], axis=1)

    def one(held: int, names: tuple[str, ...], pooled: bool) -> float:
        benchmark = table.loc[held, "benchmark"]
        train = table.index != held if pooled else (table["benchmark"] == benchmark) & (table.index != held)
        forest = RandomForestRegressor(**forest_params)  # the same forest QualityModel fits
        forest.fit(matrix(table[train], names, pooled), table.loc[train, "relative"])
        return float(forest.predict(matrix(table.loc[[held]], names, pooled))[0])

    print("\n## One model per benchmark vs one pooled model with a benchmark indicator (leave-one-run-out)\n")
    print("| benchmark | features | per-benchmark MAE / Spearman | pooled MAE / Spearman |")
    print("|---|---|---|---|")
    for benchmark in BENCHMARKS:
        held_rows = list(table.index[table["benchmark"] == benchmark])
        actual = table.loc[held_rows, "relative"].to_numpy(float)
        for name, names in SETS.items():
            cells = []
            for pooled in (False, True):
                predicted = np.array(Parallel(n_jobs=jobs)(delayed(one)(i, names, pooled) for i in held_rows))
                cells.append(f"{np.mean(np.abs(predicted - actual)):.3f} / {spearman(predicted, actual)[0]:+.2f}")
            print(f"| {benchmark} | {name} | {cells[0]} | {cells[1]} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="processes fitting held-out models at once")
    parser.add_argument("--compare-pooled", action="store_true", help="also compare with one pooled model")
    args = parser.parse_args(argv)
    from peftpick.knowledge.benchmarks import BenchmarkTable

    started = time.perf_counter()
    frame = BenchmarkTable.load().frame
    report(frame, args.jobs)
    if args.compare_pooled:
        compare_pooled(frame, args.jobs)
    print(f"\n({time.perf_counter() - started:.0f} s, {args.jobs} processes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
