"""T-Stitch (Pan et al., 2024, "T-Stitch: Accelerating Sampling in Pre-trained Diffusion Models
with Trajectory Stitching"; ../shared/METHODS.md: 40% of the early steps by DiT-S at no loss).
Early steps only set the coarse layout, which a small model trained on the same data gets right
too: the first ``fraction`` of the steps are answered by the small model, the rest by the large.

``small`` names the small model: a zoo key (``fmnist-dit-s``) or a folder holding ``config.json``
and ``model.safetensors`` (the zoo's format, or a diffusers model folder). It is called with the
large model's arguments, so it must take the same inputs and give the same output shape.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ...policy import Param, RuleSchema
from ...runtime import CallContext, StepRule
from .. import Method

SCHEMA = RuleSchema(
    method="t-stitch",
    level="step",
    summary="a small model answers the first steps, the large model the rest",
    params={
        "small": Param("str", "fmnist-dit-s", "the small model: a zoo key, or a model folder (safetensors)"),
        "fraction": Param(
            "float", 0.4, "fraction of the steps, from the start, the small model answers", min=0, max=1
        ),
    },
)


def load_small(small: str) -> torch.nn.Module:
    """The model ``small`` names, in eval mode (ValueError naming it when it cannot be loaded)."""
    from ... import zoo

    if small in zoo.MODELS:
        problem = zoo.model_problem(small)
        if problem is not None:
            raise ValueError(f"t-stitch.small: {problem}")
        folder = zoo.model_dir(small)
    else:
        folder = Path(small)
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise ValueError(
                f"t-stitch.small: {small!r} is neither a zoo key ({', '.join(zoo.MODELS)}) nor a folder "
                "with config.json and model.safetensors"
            )
    try:
        config = json.loads((folder / "config.json").read_text())
        if isinstance(config.get("model"), dict):  # the zoo's own format
            from ...zoo.train import load_weights

            return load_weights(folder)[0]
        import diffusers

        cls = getattr(diffusers, str(config.get("_class_name")), None)
        if not isinstance(cls, type) or not issubclass(cls, diffusers.ModelMixin):
            raise ValueError(f"config.json names no diffusers model class ({config.get('_class_name')!r})")
        return cls.from_pretrained(str(folder), use_safetensors=True).eval()
    except Exception as e:
        raise ValueError(f"t-stitch.small: cannot load {small!r}: {type(e).__name__}: {e}") from e


class TStitch(StepRule):
    answers_first = True  # the small model needs no earlier output

    def __init__(self, small: str, fraction: float):
        self.fraction = fraction
        self.model = load_small(small)

    def plan(self, ctx: CallContext, state: Any) -> bool:
        if ctx.num_steps is None:
            return True  # without the schedule's length there is no early part to hand over
        return ctx.step >= self.fraction * ctx.num_steps

    def estimate(self, ctx: CallContext, state: Any, rows: torch.Tensor | None) -> torch.Tensor:
        return ctx.run_model(self.model, rows)

    def observe(self, ctx: CallContext, state: Any, output: torch.Tensor, rows: torch.Tensor | None) -> None:
        pass


METHOD = Method(
    schema=SCHEMA,
    rule=TStitch,
    preset="T-Stitch: fmnist-dit-s (1/6 of fmnist-dit's FLOPs) answers the first 40% of the steps.",
    sweep=({}, {"fraction": 0.2}, {"fraction": 0.6}),
)
