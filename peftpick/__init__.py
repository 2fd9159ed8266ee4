"""peftpick: which parameter-efficient fine-tuning method to use for your model, GPU and serving stack."""

from peftpick.errors import PeftpickError
from peftpick.types import (
    Alternative,
    Architecture,
    BenchmarkEvidence,
    Candidate,
    Exclusion,
    Goal,
    MemoryEstimate,
    ProbeResult,
    Quant,
    RankedCandidate,
    Recommendation,
    Request,
    Serve,
    ServingVerdict,
    Strategy,
    TrainingPlan,
    TrainingShape,
)

__version__ = "0.1.0"


def recommend(model, vram_gb=None, serve=None, multi_adapter=False, quant="none", goal="balanced",
              seq_len=768, batch_size=None, **kwargs) -> Recommendation:
    """Rank PEFT methods for `model` on a `vram_gb` GiB GPU served with `serve`; see peftpick.recommender."""
    from peftpick.recommender import recommend as _recommend

    return _recommend(model, vram_gb, serve, multi_adapter, quant, goal, seq_len, batch_size, **kwargs)


def probe(model, methods=None, data=None, **kwargs) -> list[ProbeResult]:
    """Micro-train `methods` on `model` on this machine's GPU (or CPU) and measure them; see peftpick.probes."""
    from peftpick.probes import probe as _probe

    return _probe(model, methods, data, **kwargs)


def estimate(model, adapter="lora", **kwargs) -> MemoryEstimate:
    """Peak GPU memory of training `model` with `adapter`, without a GPU; see peftpick.estimator."""
    from peftpick.estimator import estimate as _estimate

    return _estimate(model, adapter, **kwargs)

__all__ = [
    "Alternative",
    "Architecture",
    "BenchmarkEvidence",
    "Candidate",
    "Exclusion",
    "Goal",
    "MemoryEstimate",
    "PeftpickError",
    "ProbeResult",
    "Quant",
    "RankedCandidate",
    "Recommendation",
    "Request",
    "Strategy",
    "estimate",
    "probe",
    "recommend",
    "Serve",
    "ServingVerdict",
    "TrainingPlan",
    "TrainingShape",
]
