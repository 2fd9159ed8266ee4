"""Expected quality of a method configuration, relative to plain LoRA on the same benchmark, with an interval.

The knowledge base holds one run per configuration of PEFT's method comparison suite on two benchmarks
(MetaMathQA on Llama-3.2-3B, image generation on FLUX.2-klein). `QualityModel` is a random forest fit on one
benchmark's runs that predicts score / LoRA-reference score from what a user's configuration also has:

- static features: method family (a grouping of PEFT types that generalises to types with few runs), parameter
  budget (log10 of updated / total parameters), share of a decoder layer's projection roles targeted, whether the
  MLP is targeted, log10 of the learning rate;
- early-signal features (optional): train loss early in training and how fast it falls, both relative to plain
  LoRA trained the same way (benchmark: the step-250/500 windows of MetaMathQA, 100/200 of image-gen; a user's
  probe: the two halves of its losses, relative to LoRA's probe on the same data).

One model per benchmark, not one pooled model with a benchmark indicator: the two scores saturate differently
(DINO similarity of any cat picture stays near half of LoRA's, MetaMathQA accuracy falls to zero), the early
losses are different losses, and pooling gave no consistent leave-one-run-out gain (`python
benchmarks/quality_validation.py --compare-pooled`). A user's causal LM gets the MetaMathQA model.

Interval: split-free conformal prediction on the forest's out-of-bag residuals, each scaled by the spread of the
out-of-bag trees (a locally weighted conformal score), so configurations unlike any run get wider intervals. On
~60 runs this gives close to nominal coverage held out run by run (see the benchmark script); it is not a
guarantee for another model or task, where every figure here is a prior and a probe is the check.

A configuration that *is* a benchmark run gets the run's measured figure instead, with the test set's sampling
noise as its interval (single-seed runs: seed-to-seed spread is not measured and comes on top).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.base import BaseEstimator
from sklearn.ensemble import RandomForestRegressor

from peftpick.knowledge.benchmarks import LORA_REFERENCE, parse_series
from peftpick.probes.results import fit_loss_slope
from peftpick.types import Architecture, Candidate, QualityPrediction

if TYPE_CHECKING:
    from peftpick.knowledge import KnowledgeBase

FULL_FINETUNING = "FULL_FINETUNING"
DEFAULT_BENCHMARK = "MetaMathQA"  # the text benchmark, the one whose base model is a causal LM like the user's

# PEFT type -> family. Families group methods that change the model the same way, so a type with one or two runs
# borrows strength from its relatives; "other" (a type added to the suite later) gets no family column of its own.
FAMILY_OF_TYPE: Mapping[str, str] = MappingProxyType({
    **dict.fromkeys(("LORA", "ADALORA", "DELORA", "GRALORA", "RANDLORA", "LILY", "MISS", "HIRA", "DEFT", "GLORA",
                     "PEANUT", "LOHA", "LOKR", "ADAMSS", "OSF"), "low_rank"),
    # low-rank updates built from shared or random bases: tiny budgets, the suite's outright failures among them
    **dict.fromkeys(("VERA", "PVERA", "VBLORA", "TINYLORA", "UNILORA"), "shared_basis"),
    **dict.fromkeys(("OFT", "BOFT", "HRA", "PSOFT"), "orthogonal"),
    **dict.fromkeys(("IA3", "ROAD", "LN_TUNING", "BEFT"), "scaling"),
    **dict.fromkeys(("SHIRA", "FROD", "FOURIERFT", "WAVEFT", "C3A"), "sparse_or_spectral"),
    **dict.fromkeys(("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "ADAPTION_PROMPT", "TRAINABLE_TOKENS", "CPT"),
                    "prompt"),
    FULL_FINETUNING: "full",
})
FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(FAMILY_OF_TYPE.values()))
OTHER_FAMILY = "other"

LAYER_ROLES: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
MLP_ROLES = frozenset({"gate", "up", "down"})
# Module names of the two benchmark models -> projection roles. FLUX.2's `linear_in` is the fused gate/up of its
# SwiGLU feed-forward; `to_qkv_mlp_proj` is the single-stream blocks' fused attention-and-MLP input projection.
BENCHMARK_MODULE_ROLES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "o_proj": ("o",),
    "gate_proj": ("gate",), "up_proj": ("up",), "down_proj": ("down",),
    "to_q": ("q",), "add_q_proj": ("q",), "to_k": ("k",), "add_k_proj": ("k",), "to_v": ("v",), "add_v_proj": ("v",),
    "to_out.0": ("o",), "to_add_out": ("o",), "linear_in": ("gate", "up"), "linear_out": ("down",),
    "to_qkv_mlp_proj": ("q", "k", "v", "gate", "up"),
})

# (first, second) train-loss window ends, in steps, that the early-signal features read (both still in warm-up on
# MetaMathQA; knowledge-facts §e).
EARLY_WINDOWS: Mapping[str, tuple[int, int]] = MappingProxyType({"MetaMathQA": (250, 500), "image-gen": (100, 200)})
# Test-set sizes for the sampling noise of a measured run (GSM8K test). image-gen's DINO score has no such model.
TEST_SET_SIZE: Mapping[str, int] = MappingProxyType({"MetaMathQA": 1319})
# Late validation scores whose spread is the noise of a benchmark without a counted test set (image-gen), and the
# (validation, test) image counts that scale it to the test figure (the suite's run_info.train_config: valid_size
# 2, test_size 4; a mean over n images has a spread of 1/sqrt(n)).
LATE_VALIDATIONS = 3
EVALUATION_IMAGES: Mapping[str, tuple[int, int]] = MappingProxyType({"image-gen": (2, 4)})

STATIC_FEATURES: tuple[str, ...] = ("family", "log_budget", "role_share", "targets_mlp", "log_learning_rate")
EARLY_FEATURES: tuple[str, ...] = ("early_loss_ratio", "early_drop_ratio")
FEATURE_SETS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "static": STATIC_FEATURES,
    "early": STATIC_FEATURES + EARLY_FEATURES,
})
ALL_FEATURES: tuple[str, ...] = STATIC_FEATURES + EARLY_FEATURES

# Settings compared to decide whether a candidate is exactly its benchmark run (width-dependent block sizes are
# left out: the catalogue adapts them to each architecture).
_IDENTITY_SETTINGS = ("r", "lora_alpha", "use_rslora", "use_dora", "init_lora_weights", "num_virtual_tokens",
                      "target_r", "init_r")

Features = dict[str, Any]


# ============================================================================================ features


def family_of(peft_type: str | None) -> str:
    """The family of a PEFT type (None: full fine-tuning); "other" for a type the grouping does not know."""
    return FAMILY_OF_TYPE.get(FULL_FINETUNING if peft_type is None else str(peft_type).upper(), OTHER_FAMILY)


def features_of_run(row: Mapping[str, Any] | pd.Series,
                    reference: Mapping[str, Any] | pd.Series | None = None) -> Features:
    """Features of one benchmark run (a row of `BenchmarkTable.frame`).

    reference: the benchmark's plain-LoRA run (`BenchmarkTable.lora_reference`); without it the early-signal
        features are NaN.
    """
    peft_type = str(row["peft_type"])
    family = family_of(peft_type)
    if family == "full":
        roles = set(LAYER_ROLES)
    elif family == "prompt":
        roles = set()  # virtual tokens, embeddings or attention prompts: no projection is adapted
    else:
        roles = {role for name in _split_targets(row.get("target_modules", ""))
                 for role in BENCHMARK_MODULE_ROLES.get(name, ())}
    trainable, total = _number(row.get("num_trainable_params")), _number(row.get("num_total_params"))
    features = _static_features(family, roles, len(LAYER_ROLES), trainable, total, _number(row.get("learning_rate")))
    early = {name: math.nan for name in EARLY_FEATURES}
    benchmark = str(row.get("benchmark", ""))
    if reference is not None and benchmark in EARLY_WINDOWS:
        early = _early_features_from_windows(parse_series(row.get("train_loss_series", "")),
                                             parse_series(reference.get("train_loss_series", "")),
                                             EARLY_WINDOWS[benchmark])
    return {**features, **early}


def features_of_candidate(candidate: Candidate, arch: Architecture, trainable_params: int | None,
                          total_params: int | None, probe_losses: Sequence[float] | None = None,
                          reference_losses: Sequence[float] | None = None,
                          listed_modules: Sequence[Any] | None = None) -> Features:
    """Features of a catalogue candidate for `arch`, comparable with `features_of_run`.

    trainable_params / total_params: as the memory estimate or a probe counts them (every parameter with
        requires_grad / every parameter, adapter included). LoRA-FA's frozen A matrices are taken off here, as the
        benchmark counts only what its optimizer updates. None: the budget feature is NaN (full fine-tuning: 0).
    probe_losses / reference_losses: per-step losses of this candidate's probe and of plain LoRA's probe on the same
        data, steps and setting; both are needed for the early-signal features (NaN otherwise).
    listed_modules: the workload's `layer_modules` listing of `arch`, when the caller has it (a denoiser's is
        built from its diffusers class, which a process without torch and diffusers would have to import).
    """
    family = family_of(candidate.peft_type)
    layer_modules = _decoder_layer_modules(arch, listed_modules)
    arch_roles = {role for module in layer_modules for role in module.roles} or set(LAYER_ROLES)
    targeted_modules = _targeted_modules(candidate, layer_modules)
    if family == "full":
        roles = set(arch_roles)
    elif family == "prompt":
        roles = set()
    else:
        roles = {role for module in targeted_modules for role in module.roles}
    updated = float(trainable_params) if trainable_params is not None else math.nan
    if candidate.optimizer == "lora-fa" and targeted_modules:
        # LoRA-FA freezes A (r x in) and trains B (out x r): the updated share is sum(out) / sum(in + out).
        outputs = sum(module.out_features for module in targeted_modules)
        updated *= outputs / sum(module.in_features + module.out_features for module in targeted_modules)
    total = float(total_params) if total_params is not None else math.nan
    if family == "full" and (trainable_params is None or total_params is None):
        updated = total = 1.0  # every parameter is trained: the budget is 1 whatever the size
    features = _static_features(family, roles, len(arch_roles), updated, total, float(candidate.learning_rate))
    early, _ = probe_features(probe_losses, reference_losses)
    return {**features, **early}


def probe_features(probe_losses: Sequence[float] | None,
                   reference_losses: Sequence[float] | None) -> tuple[Features, str | None]:
    """Early-signal features from a candidate's probe losses and plain LoRA's, and why they are missing (or None).

    The probe's two halves stand in for the benchmark's two early windows: the ratio to LoRA on the same probe is
    what carries over, not the loss itself. That mapping is an assumption (the suite has no short probes to check
    it against); it is why the probe's figure is reported as a prior, never as a measurement.
    """
    missing = {name: math.nan for name in EARLY_FEATURES}
    if probe_losses is None or reference_losses is None:
        return missing, "no probe of both this candidate and plain LoRA"
    candidate_halves = _halves(probe_losses)
    reference_halves = _halves(reference_losses)
    if candidate_halves is None or reference_halves is None:
        return missing, "a probe has fewer than 4 losses, or a non-finite one"
    first, second = candidate_halves
    ref_first, ref_second = reference_halves
    features = _early_features(first, second, ref_first, ref_second)
    if any(math.isnan(value) for value in features.values()):
        return missing, "plain LoRA's probe loss did not fall, so there is nothing to compare with"
    return features, None


def _static_features(family: str, roles: set[str], roles_in_layer: int, updated: float, total: float,
                     learning_rate: float) -> Features:
    budget = math.log10(updated / total) if updated > 0 and total > 0 else math.nan
    return {
        "family": family,
        "log_budget": budget,
        "role_share": len(roles) / roles_in_layer if roles_in_layer else 0.0,
        "targets_mlp": float(bool(roles & MLP_ROLES)),
        "log_learning_rate": math.log10(learning_rate) if learning_rate > 0 else math.nan,
    }


def _early_features_from_windows(series: list[tuple[int, float]], reference: list[tuple[int, float]],
                                 windows: tuple[int, int]) -> Features:
    values, reference_values = dict(series), dict(reference)
    if not all(step in values and step in reference_values for step in windows):
        return {name: math.nan for name in EARLY_FEATURES}
    first, second = windows
    return _early_features(values[first], values[second], reference_values[first], reference_values[second])


def _early_features(first: float, second: float, reference_first: float, reference_second: float) -> Features:
    """Loss in the second window relative to LoRA's, and the relative fall between windows relative to LoRA's."""
    reference_drop = (reference_first - reference_second) / reference_first if reference_first > 0 else math.nan
    drop = (first - second) / first if first > 0 else math.nan
    usable = reference_second > 0 and reference_drop > 0  # a LoRA that did not learn is no yardstick
    return {
        "early_loss_ratio": second / reference_second if usable else math.nan,
        "early_drop_ratio": drop / reference_drop if usable else math.nan,
    }


def _halves(losses: Sequence[float]) -> tuple[float, float] | None:
    values = [float(value) for value in losses]
    if len(values) < 4 or not all(math.isfinite(value) for value in values):
        return None
    middle = len(values) // 2
    return float(np.mean(values[:middle])), float(np.mean(values[middle:]))


def _split_targets(text: Any) -> list[str]:
    return [name for name in str(text or "").split("|") if name]


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# A denoiser layer's roles (knowledge.denoiser_targets) as the projection roles the benchmark runs are read in.
_DENOISER_LAYER_ROLES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "attn": ("q", "k", "v", "o"), "context_attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down"),
    "fused": ("q", "k", "v", "gate", "up"),
})


def _decoder_layer_modules(arch: Architecture, listed: Sequence[Any] | None = None):
    """The layers of `arch` a method can target, their roles in the benchmark runs' terms (LAYER_ROLES);
    `listed`: the workload's listing of them, when already made."""
    import dataclasses

    from peftpick.workloads import workload_of

    if listed is None:
        listed = workload_of(arch).hook("layer_modules")(arch)
    modules = [module for module in listed if module.targetable]
    if arch.denoiser is None:
        return tuple(modules)
    return tuple(dataclasses.replace(module, roles=tuple(dict.fromkeys(
        role for own in module.roles for role in _DENOISER_LAYER_ROLES.get(own, ())))) for module in modules)


def _targeted_modules(candidate: Candidate, layer_modules) -> tuple:
    targets = candidate.peft_kwargs.get("target_modules")
    if not targets:
        return ()
    if isinstance(targets, str):
        if targets == "all-linear":
            return tuple(layer_modules)
        targets = [targets]
    wanted = set(targets)
    return tuple(module for module in layer_modules
                 if module.target in wanted or any(module.path.endswith("." + name) for name in wanted))


# ============================================================================================ the model


class QualityModel(BaseEstimator):
    """Predicts score / LoRA-reference score of a configuration on one benchmark, with a conformal interval.

    features: "static", "early" (static plus early-signal features) or a tuple of feature names from
        ALL_FEATURES.
    interval: the central coverage the intervals aim at (0.8: 80 % of held-out runs inside).
    benchmark: which benchmark's runs `fit` uses ("MetaMathQA" or "image-gen").
    n_estimators, min_samples_leaf, max_features: the random forest's; the defaults were set once, not tuned
        (60 and 100 trees give the same validation figures to +-0.005 MAE; 60 keep the validation under a minute).
    random_state: seeds the forest; the same seed gives the same predictions.
    """

    def __init__(self, features: str | tuple[str, ...] = "static", interval: float = 0.8,
                 benchmark: str = DEFAULT_BENCHMARK, n_estimators: int = 60, min_samples_leaf: int = 2,
                 max_features: float = 0.5, random_state: int | None = 0):
        self.features = features
        self.interval = interval
        self.benchmark = benchmark
        self.n_estimators = n_estimators
        self.min_samples_leaf = min_samples_leaf
        self.max_features = max_features
        self.random_state = random_state

    # ------------------------------------------------------------------------------------------ building

    @classmethod
    def from_knowledge(cls, kb: KnowledgeBase, **params: Any) -> QualityModel:
        """A model fit on the bundled benchmark table (`params` as for the constructor)."""
        return cls(**params).fit(kb.benchmarks.frame)

    def fit(self, runs: pd.DataFrame, reference: pd.Series | None = None) -> QualityModel:
        """Fit on benchmark runs (rows of `BenchmarkTable.frame`; rows of other benchmarks are ignored).

        reference: the plain-LoRA run whose score is 1.0 (default: the `LORA_REFERENCE` run found in `runs`); pass
            it when `runs` leaves it out, as leave-one-run-out validation does when it holds that run out.
        """
        feature_names = self._validated_feature_names()
        benchmark_runs = runs[runs["benchmark"] == self.benchmark].reset_index(drop=True)
        if benchmark_runs.empty:
            raise ValueError(f"no {self.benchmark} runs to fit on")
        if reference is None:
            reference = _reference_run(benchmark_runs, self.benchmark)
        table = run_features(benchmark_runs, reference)
        table["relative"] = benchmark_runs["score"].astype(float) / float(reference["score"])
        usable = table[list(_numeric(feature_names))].notna().all(axis=1) & table["relative"].notna()
        if usable.sum() < 10:
            raise ValueError(f"only {int(usable.sum())} {self.benchmark} runs have every feature of {feature_names}; "
                             "a model needs at least 10")

        self.feature_names_ = feature_names
        self.columns_ = _design_columns(feature_names)
        self.reference_run_ = str(reference["experiment"])
        self.reference_score_ = float(reference["score"])
        self.runs_ = benchmark_runs[usable.to_numpy()].reset_index(drop=True)
        self.skipped_runs_ = tuple(benchmark_runs.loc[~usable.to_numpy(), "experiment"])
        self.n_runs_ = int(usable.sum())
        X = self._design(table[usable])
        y = table.loc[usable, "relative"].to_numpy(dtype=float)
        self.forest_ = RandomForestRegressor(
            n_estimators=self.n_estimators, min_samples_leaf=self.min_samples_leaf, max_features=self.max_features,
            random_state=self.random_state,
        ).fit(X, y)
        self._calibrate(X, y)
        return self

    def _calibrate(self, X: np.ndarray, y: np.ndarray) -> None:
        """Conformal scale from out-of-bag residuals, each divided by the spread of its out-of-bag trees."""
        per_tree = self._tree_predictions(X)
        out_of_bag = np.ones_like(per_tree, dtype=bool)
        for tree, sample in enumerate(self.forest_.estimators_samples_):
            out_of_bag[tree, sample] = False
        counts = out_of_bag.sum(axis=0)
        if (counts == 0).any():
            raise ValueError("some runs are in every tree's bootstrap sample; use more n_estimators")
        oob_mean = np.where(out_of_bag, per_tree, 0.0).sum(axis=0) / counts
        oob_spread = np.sqrt(np.where(out_of_bag, (per_tree - oob_mean) ** 2, 0.0).sum(axis=0) / counts)
        # A floor keeps runs whose trees happen to agree from getting zero-width intervals.
        self.spread_floor_ = max(float(np.median(oob_spread)) * 0.5, 1e-6)
        scores = np.abs(y - oob_mean) / (oob_spread + self.spread_floor_)
        rank = min(len(scores), math.ceil((len(scores) + 1) * self.interval))  # finite-sample conformal quantile
        self.conformal_scale_ = float(np.sort(scores)[rank - 1])
        self.oob_predictions_ = oob_mean
        self.oob_mae_ = float(np.mean(np.abs(y - oob_mean)))

    # ------------------------------------------------------------------------------------------ predicting

    def predict(self, X: pd.DataFrame | Iterable[Mapping[str, Any]]) -> np.ndarray:
        """Expected score relative to plain LoRA for each row of feature dicts / a feature frame."""
        self._check_fitted()
        return self._tree_predictions(self._design(_as_frame(X))).mean(axis=0)

    def predict_interval(self, X: pd.DataFrame | Iterable[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) of the `interval` prediction interval for each row; low never goes below 0."""
        self._check_fitted()
        per_tree = self._tree_predictions(self._design(_as_frame(X)))
        centre = per_tree.mean(axis=0)
        half_width = self.conformal_scale_ * (per_tree.std(axis=0) + self.spread_floor_)
        return np.maximum(centre - half_width, 0.0), centre + half_width

    def _tree_predictions(self, X: np.ndarray) -> np.ndarray:
        """(trees, rows) predictions: the leaf each row reaches in each tree, and that leaf's mean target (one
        `apply` call instead of a validated `predict` per tree, which is most of the time on ~60 runs)."""
        self._check_fitted()
        leaves = self.forest_.apply(X)
        return np.stack([tree.tree_.value[leaves[:, index], 0, 0]
                         for index, tree in enumerate(self.forest_.estimators_)])

    # ------------------------------------------------------------------------------------------ helpers

    def _validated_feature_names(self) -> tuple[str, ...]:
        """Every constructor parameter is checked here, at fit time (sklearn convention)."""
        if isinstance(self.features, str):
            if self.features not in FEATURE_SETS:
                raise ValueError(f"features must be one of {', '.join(FEATURE_SETS)} or a tuple of feature names, "
                                 f"not {self.features!r}")
            names = FEATURE_SETS[self.features]
        else:
            names = tuple(self.features)
            unknown = [name for name in names if name not in ALL_FEATURES]
            if unknown or not names or len(set(names)) != len(names):
                raise ValueError(f"features must be distinct names from {', '.join(ALL_FEATURES)}; got {names!r}")
        if not isinstance(self.interval, (int, float)) or not 0 < self.interval < 1:
            raise ValueError(f"interval must be a coverage between 0 and 1 (e.g. 0.8), not {self.interval!r}")
        if self.benchmark not in LORA_REFERENCE:
            raise ValueError(f"benchmark must be one of {', '.join(LORA_REFERENCE)}, not {self.benchmark!r}")
        if isinstance(self.n_estimators, bool) or not isinstance(self.n_estimators, int) or self.n_estimators < 20:
            raise ValueError(f"n_estimators must be a whole number of at least 20 (every run needs out-of-bag "
                             f"trees), not {self.n_estimators!r}")
        if isinstance(self.min_samples_leaf, bool) or not isinstance(self.min_samples_leaf, int) \
                or self.min_samples_leaf < 1:
            raise ValueError(f"min_samples_leaf must be a positive whole number, not {self.min_samples_leaf!r}")
        if not isinstance(self.max_features, (int, float)) or not 0 < self.max_features <= 1:
            raise ValueError(f"max_features must be a share in (0, 1], not {self.max_features!r}")
        if self.random_state is not None and (isinstance(self.random_state, bool)
                                              or not isinstance(self.random_state, int)):
            raise ValueError(f"random_state must be a whole number or None, not {self.random_state!r}")
        return names

    def _design(self, frame: pd.DataFrame) -> np.ndarray:
        """Feature frame -> matrix: the family one-hot (known families only), then the numeric features."""
        missing = [name for name in self.feature_names_ if name not in frame.columns]
        if missing:
            raise ValueError(f"features {', '.join(missing)} are missing; build rows with features_of_run or "
                             "features_of_candidate")
        numeric = list(_numeric(self.feature_names_))
        values = frame[numeric].astype(float)
        if values.isna().any().any():
            row, column = np.argwhere(values.isna().to_numpy())[0]
            column = numeric[column]
            raise ValueError(f"feature {column} is missing (NaN) in row {row}; a model without it (e.g. "
                             "features='static' when there is no probe) can predict this row")
        parts = []
        if "family" in self.feature_names_:
            families = frame["family"].astype(str).to_numpy()
            parts.append(np.stack([(families == family).astype(float) for family in FAMILIES], axis=1))
        parts.append(values.to_numpy())
        return np.concatenate(parts, axis=1)

    def _check_fitted(self) -> None:
        if not hasattr(self, "forest_"):
            raise ValueError("this QualityModel is not fitted yet; call fit(runs) or QualityModel.from_knowledge(kb)")


def run_features(runs: pd.DataFrame, reference: Mapping[str, Any] | pd.Series | None) -> pd.DataFrame:
    """`features_of_run` for every row of `runs`, as a frame with the runs' index."""
    return pd.DataFrame([features_of_run(row, reference) for _, row in runs.iterrows()], index=runs.index,
                        columns=list(ALL_FEATURES))


def _reference_run(runs: pd.DataFrame, benchmark: str) -> pd.Series:
    experiment = LORA_REFERENCE[benchmark]
    match = runs[runs["experiment"] == experiment]
    if match.empty:
        raise ValueError(f"the {benchmark} runs lack the plain-LoRA reference {experiment}")
    return match.iloc[0]


def _numeric(feature_names: Iterable[str]) -> tuple[str, ...]:
    return tuple(name for name in feature_names if name != "family")


def _design_columns(feature_names: tuple[str, ...]) -> tuple[str, ...]:
    families = tuple(f"family={family}" for family in FAMILIES) if "family" in feature_names else ()
    return families + _numeric(feature_names)


def _as_frame(X: pd.DataFrame | Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    if isinstance(X, pd.DataFrame):
        return X
    if isinstance(X, Mapping):
        return pd.DataFrame([X])
    return pd.DataFrame(list(X))


# ============================================================================================ predictions


@dataclass(frozen=True)
class QualityAssessor:
    """Expected quality of catalogue candidates: the benchmark run where a candidate is one, else the model.

    Build it with `QualityAssessor.from_knowledge(kb)`; it holds a static model and, for candidates with a probe of
    their own and of plain LoRA, a model with the early-signal features.
    """

    static_model: QualityModel
    early_model: QualityModel

    @classmethod
    def from_knowledge(cls, kb: KnowledgeBase, benchmark: str = DEFAULT_BENCHMARK, interval: float = 0.8,
                       random_state: int | None = 0) -> QualityAssessor:
        runs = kb.benchmarks.frame
        common = {"benchmark": benchmark, "interval": interval, "random_state": random_state}
        return cls(QualityModel(features="static", **common).fit(runs),
                   QualityModel(features="early", **common).fit(runs))

    def assess(self, candidate: Candidate, arch: Architecture, trainable_params: int | None,
               total_params: int | None, probe_losses: Sequence[float] | None = None,
               reference_losses: Sequence[float] | None = None,
               listed_modules: Sequence[Any] | None = None) -> QualityPrediction:
        """The candidate's expected quality.

        trainable_params / total_params: as for `features_of_candidate`; needed unless the candidate is its
            benchmark run or full fine-tuning (ValueError from the model otherwise).
        probe_losses / reference_losses: per-step losses of this candidate's probe and of plain LoRA's on the same
            data. With both, the early-signal model gives the figure (unless the candidate is a benchmark run); with
            `probe_losses`, `non_learning` says whether its loss failed to fall.
        """
        model = self.static_model
        non_learning = _learning_verdict(probe_losses)
        prior = _prior_words(arch, model)
        run = matching_run(candidate, arch, model.runs_, listed_modules)
        if run is not None:
            low, high = measurement_interval(run, model.reference_score_, model.interval)
            probe_words = "; the probe was used only to check that the loss falls" if probe_losses is not None else ""
            noise = (f"sampling noise of its {TEST_SET_SIZE[model.benchmark]:,} test questions only (one seed; "
                     "seed-to-seed spread comes on top)" if model.benchmark in TEST_SET_SIZE else
                     f"the spread of its last {LATE_VALIDATIONS} validation scores, scaled to the test images (a few images are "
                     "scored; one seed)"
                     if late_validation_spread(run) is not None else "none known")
            return QualityPrediction(
                relative=float(run["score"]) / model.reference_score_, low=low, high=high,
                basis=(f"benchmark run {run['experiment']} ({run['benchmark']}: {float(run['score']):.1%} "
                       f"{run['metric']} vs {model.reference_score_:.1%} for plain LoRA); interval: {noise}"
                       f"{probe_words}; {prior}"),
                source="benchmark run", level=model.interval, non_learning=non_learning,
            )
        features = features_of_candidate(candidate, arch, trainable_params, total_params, probe_losses,
                                         reference_losses, listed_modules)
        _, missing_probe = probe_features(probe_losses, reference_losses)
        used_probe = missing_probe is None
        if used_probe:
            model = self.early_model
        relative = float(model.predict([features])[0])
        low, high = (float(bound[0]) for bound in model.predict_interval([features]))
        probe_words = ("; with early-loss features from your probe, relative to plain LoRA's probe" if used_probe
                       else "" if probe_losses is None else f"; probe not used for the figure: {missing_probe}")
        return QualityPrediction(
            relative=relative, low=low, high=high,
            basis=(f"model fit on {model.n_runs_} {model.benchmark} runs (out-of-bag MAE {model.oob_mae_:.2f} "
                   f"relative to LoRA){probe_words}; {prior}"),
            source="model", level=model.interval, used_probe=used_probe, non_learning=non_learning,
        )


def matching_run(candidate: Candidate, arch: Architecture, runs: pd.DataFrame,
                 listed_modules: Sequence[Any] | None = None) -> pd.Series | None:
    """The benchmark run the candidate's settings equal (type, targeted roles, rank-like settings, learning rate,
    optimizer), or None when it has none or differs from it. listed_modules: as for `features_of_candidate`."""
    if candidate.benchmark_run is None:
        return None
    match = runs[runs["experiment"] == candidate.benchmark_run]
    if match.empty:
        return None
    run = match.iloc[0]
    if str(run["peft_type"]) != (candidate.peft_type or FULL_FINETUNING):
        return None
    if not math.isclose(float(run["learning_rate"]), float(candidate.learning_rate), rel_tol=1e-6):
        return None
    if str(run["optimizer"]).strip().lower().replace("lorafa", "lora-fa") != candidate.optimizer:
        return None
    of_run = features_of_run(run)
    of_candidate = features_of_candidate(candidate, arch, None, None, listed_modules=listed_modules)
    if any(of_run[name] != of_candidate[name] for name in ("family", "role_share", "targets_mlp")):
        return None
    stored = _stored_config(run)
    for key in _IDENTITY_SETTINGS:
        if key in stored and key in candidate.peft_kwargs and stored[key] != candidate.peft_kwargs[key]:
            return None
    return run


def measurement_interval(run: Mapping[str, Any] | pd.Series, reference_score: float,
                         level: float = 0.8) -> tuple[float, float]:
    """Interval of a measured run's relative score from its test set's sampling noise (Wilson score interval on a
    benchmark with a counted test set); the run's own figure both ends where the benchmark has no such model."""
    score = float(run["score"])
    questions = TEST_SET_SIZE.get(str(run["benchmark"]))
    if questions is None:
        spread = late_validation_spread(run)
        if spread is None:
            return score / reference_score, score / reference_score
        valid, test = EVALUATION_IMAGES.get(str(run["benchmark"]), (1, 1))
        half = float(stats.norm.ppf(0.5 + level / 2)) * spread * math.sqrt(valid / test)
        return max(score - half, 0.0) / reference_score, (score + half) / reference_score
    z = float(stats.norm.ppf(0.5 + level / 2))
    centre = (score + z * z / (2 * questions)) / (1 + z * z / questions)
    half = z / (1 + z * z / questions) * math.sqrt(score * (1 - score) / questions + z * z / (4 * questions**2))
    return max(centre - half, 0.0) / reference_score, (centre + half) / reference_score


def late_validation_spread(run: Mapping[str, Any] | pd.Series, last: int = LATE_VALIDATIONS) -> float | None:
    """Standard deviation of the run's last `last` validation scores (None with fewer). image-gen scores a handful
    of images, so its test figure has no counted sampling model; how much the validation score moves between
    evaluations late in training, when the adapter changes little, measures that noise instead."""
    text = str(run.get("valid_series", "") or "")
    values = []
    for item in text.split(";"):
        _, _, value = item.partition(":")
        try:
            values.append(float(value))
        except ValueError:
            continue
    if len(values) < last:
        return None
    return float(np.std(values[-last:], ddof=1))


def _stored_config(run: Mapping[str, Any] | pd.Series) -> dict[str, Any]:
    import json

    text = run.get("peft_config_json", "")
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}


def _prior_words(arch: Architecture, model: QualityModel) -> str:
    base_model = str(model.runs_.iloc[0]["base_model"])
    if arch.hub_id is not None and arch.hub_id.lower() == base_model.lower():
        return (f"the benchmark trains this model on {model.benchmark}: for another task it is a prior, and a "
                "probe on your data is the check")
    return (f"the benchmark trains {base_model.split('/')[-1]} on {model.benchmark}: for {arch.name} and your task "
            "it is a prior, and a probe on your model is the check")


def _learning_verdict(probe_losses: Sequence[float] | None) -> str | None:
    if probe_losses is None:
        return None
    try:
        return flag_non_learning(probe_losses)
    except ValueError:
        return None  # too few steps to judge: no flag rather than a guess


# ============================================================================================ reading the figures


def flag_non_learning(losses: Sequence[float], confidence: float = 0.95) -> str | None:
    """Why a probe's loss does not show learning, or None when it falls significantly.

    Flags a loss that became non-finite, or whose least-squares slope per step is not below zero by a one-sided t
    test at `confidence` (a flat, rising or too noisy loss). Needs at least 3 losses (ValueError otherwise).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence!r}")
    values = [float(value) for value in losses]
    if not all(math.isfinite(value) for value in values):
        return "the probe loss became non-finite (the run diverged)"
    if len(values) < 3:
        raise ValueError(f"{len(values)} losses cannot show a trend; probe at least 3 steps")
    slope, stderr = fit_loss_slope(values)
    assert slope is not None and stderr is not None  # finite values, n >= 3
    if stderr == 0:
        falls = slope < 0
    else:
        falls = slope / stderr < -float(stats.t.ppf(confidence, len(values) - 2))
    if falls:
        return None
    return (f"the probe loss does not fall: slope {slope:+.3g} per step (standard error {stderr:.2g}) over "
            f"{len(values)} steps is not below zero at {confidence:.0%} confidence")



class QualityModels:
    """The quality assessor of each benchmark, fitted on first use or, with `prefit`, of all of them at once (as the
    forked child of `recommender.background` does while the command imports torch)."""

    def __init__(self, kb: KnowledgeBase, prefit: Iterable[str] = ()):
        self._kb = kb
        self._assessors: dict[str, QualityAssessor] = {}
        for benchmark in prefit:
            self._assessor(benchmark)

    def _assessor(self, benchmark: str) -> QualityAssessor:
        if benchmark not in self._assessors:
            self._assessors[benchmark] = QualityAssessor.from_knowledge(self._kb, benchmark)
        return self._assessors[benchmark]

    def assess(self, benchmark: str, *args: Any) -> QualityPrediction:
        """`QualityAssessor.assess(*args)` with `benchmark`'s assessor."""
        return self._assessor(benchmark).assess(*args)
