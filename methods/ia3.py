"""IA3: one learned scaling vector per targeted layer; MLP ("feed-forward") layers scale their input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftpick.methods.base import BuildContext, MethodSpec

# Roles whose layers IA3 treats as feed-forward (scales the input rather than the output), as PEFT's defaults do.
_FEEDFORWARD_ROLES = frozenset({"gate", "up", "down"})


@dataclass(frozen=True)
class IA3Spec(MethodSpec):
    """`feedforward_modules` must name targeted modules of this architecture, so it is rebuilt from the targets:
    every targeted layer that plays an MLP role (Phi-3's gate_up_proj, GPT-2's c_fc and mlp.c_proj ...)."""

    def _fit_to_architecture(self, settings: dict[str, Any], context: BuildContext) -> list[str]:
        if context.arch.denoiser is not None:
            return []  # set from the image run's own feed-forward choice when the targets were chosen
        feedforward = [layer.target for layer in context.layers if set(layer.roles) & _FEEDFORWARD_ROLES]
        settings["feedforward_modules"] = list(dict.fromkeys(feedforward))
        return []


IA3 = IA3Spec(
    key="ia3",
    display_name="IA3",
    peft_type="IA3",
    config_class="IA3Config",
    family="ia3",
    summary="Learns one scaling vector per targeted layer (all attention and MLP projections); the smallest "
            "adapters here, at a high learning rate.",
    benchmark_run="ia3/llama-3.2-3B-all-attn-5k-lr0.005",
    aliases=("(ia)3", "ia^3"),
    rank_key=None,
)

SPECS: tuple[MethodSpec, ...] = (IA3,)
