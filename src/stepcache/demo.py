"""``stepcache demo``: full compute vs a policy on a shipped model, side by side, measured."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import zoo
from ._env import environment
from ._io import atomic_write_many, check_out_dir, json_bytes
from ._limits import MAX_DEMO_SAMPLES, MAX_GUIDANCE, MAX_REPEATS, MAX_SEED, MAX_STEPS, check_float, check_int
from .api import PolicyLike, disable, enable, resolve_policy
from .metrics import psnr_per_image

DEMO_FILES = ("grid.png", "result.json")


def conditions(pipe: Any, n: int, seeds: list[int] | None = None) -> dict[str, list]:
    """``n`` conditioning inputs for a zoo pipeline: class labels 0-9 in turn, emoji captions, or
    shapes-world captions picked by seed (``seeds``, default 0..n-1)."""
    from .zoo.pipeline import CaptionPipeline, TextConditionalPipeline
    from .zoo.shapes import eval_captions
    from .zoo.text import DEMO_PROMPTS

    if isinstance(pipe, CaptionPipeline):
        return {"prompt": eval_captions(list(seeds) if seeds is not None else list(range(n)), pipe.is_video)}
    if isinstance(pipe, TextConditionalPipeline):
        return {"prompt": [DEMO_PROMPTS[i % len(DEMO_PROMPTS)] for i in range(n)]}
    return {"class_labels": [i % pipe.num_classes for i in range(n)]}


def _generate(pipe: Any, cond: dict[str, list], steps: int, guidance: float, seed: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    return pipe(**cond, num_inference_steps=steps, guidance_scale=guidance, generator=gen).images


def grid_png(rows: list[np.ndarray], scale: int = 6) -> bytes:
    """PNG bytes of image rows (each (N, H, W, C) in [0, 1]) stacked vertically, 2-pixel gaps."""
    import io

    from PIL import Image

    n, h, w, c = rows[0].shape
    gap = 2
    canvas = np.ones(((h + gap) * len(rows) - gap, (w + gap) * n - gap, 3), dtype=np.float32)
    for r, imgs in enumerate(rows):
        for i, img in enumerate(imgs):
            img = np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img
            canvas[r * (h + gap) : r * (h + gap) + h, i * (w + gap) : i * (w + gap) + w] = img
    pil = Image.fromarray((np.clip(canvas, 0, 1) * 255).round().astype(np.uint8))
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def _adherence(
    model: str, cond: dict[str, list], reference: np.ndarray, accelerated: np.ndarray
) -> dict[str, float] | None:
    from .bench.harness import adherence

    captions = cond.get("prompt")
    full = adherence(model, reference, captions)
    if full is None:
        return None
    return {"reference": full, "accelerated": adherence(model, accelerated, captions)}


def check_demo_args(
    model: str, steps: int | None, guidance: float | None, samples: int, seed: int, repeats: int
) -> None:
    """ValueError naming the first argument the machine cannot run (see ``_limits``)."""
    if (problem := zoo.model_problem(model)) is not None:
        raise ValueError(f"model: {problem}")
    if steps is not None:
        check_int("steps", steps, 1, MAX_STEPS)
    if guidance is not None:
        check_float("guidance", guidance, 0.0, MAX_GUIDANCE)
    check_int("samples", samples, 1, MAX_DEMO_SAMPLES)
    check_int("seed", seed, 0, MAX_SEED)
    check_int("repeats", repeats, 1, MAX_REPEATS)


def run_demo(
    model: str = "fmnist-dit",
    policy: PolicyLike = "fbcache",
    steps: int | None = None,
    guidance: float | None = None,
    samples: int = 16,
    seed: int = 0,
    repeats: int = 5,
    out_dir: str | Path = "stepcache-demo",
    command: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Generate ``samples`` images with full compute and with ``policy``; time both; compare.

    Timing: one warm-up run of each is excluded, then ``repeats`` interleaved runs of each;
    the median is reported. Writes ``grid.png`` (reference row, accelerated row, 4x difference)
    and ``result.json`` into ``out_dir`` and returns the result.
    """
    check_demo_args(model, steps, guidance, samples, seed, repeats)
    pol = resolve_policy(policy)
    out = check_out_dir(out_dir, DEMO_FILES)  # before the model loads, not after the timing
    pipe = zoo.load(model)
    steps = steps or pipe.default_steps
    guidance = pipe.default_guidance if guidance is None else guidance
    cond = conditions(pipe, samples)
    say = progress or (lambda msg: None)

    say("warm-up")
    reference = _generate(pipe, cond, steps, guidance, seed)
    handle = enable(pipe, pol)
    accelerated = _generate(pipe, cond, steps, guidance, seed)
    disable(pipe)

    times: dict[str, list[float]] = {"reference": [], "accelerated": []}
    for r in range(repeats):
        say(f"timing {r + 1}/{repeats}")
        for kind in ("reference", "accelerated"):
            if kind == "accelerated":
                handle = enable(pipe, pol)
            t0 = time.perf_counter()
            images = _generate(pipe, cond, steps, guidance, seed)
            times[kind].append(time.perf_counter() - t0)
            if kind == "accelerated":
                stats = handle.stats()
                disable(pipe)
                if not np.array_equal(images, accelerated):
                    raise RuntimeError("accelerated run is not deterministic across repeats")

    psnr = psnr_per_image(accelerated, reference)
    finite = psnr[np.isfinite(psnr)]
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": model,
        "policy": pol.to_dict(),
        "steps": steps,
        "guidance_scale": guidance,
        "samples": samples,
        "seed": seed,
        "denoiser_calls": stats["steps"],
        "computed": stats["computed"],
        "partial": stats["partial"],
        "estimated": stats["estimated"],
        "cfg_skipped": stats["cfg_skipped"],
        "actions": "".join(stats["actions"]),
        "latency_s": {
            "reference_median": median["reference"],
            "accelerated_median": median["accelerated"],
            "reference_all": times["reference"],
            "accelerated_all": times["accelerated"],
        },
        "speedup": median["reference"] / median["accelerated"],
        "psnr_db_mean": float(finite.mean()) if finite.size else None,
        "psnr_identical_images": int((~np.isfinite(psnr)).sum()),
        # A shapes model's prompt-following, judged, for both rows (None for other models).
        "adherence": _adherence(model, cond, reference, accelerated),
        **environment(),
        "command": command,
    }
    diff = np.clip(np.abs(accelerated - reference) * 4, 0, 1)
    result["grid_png"] = str(out / "grid.png")
    result["result_json"] = str(out / "result.json")
    # Both are staged before either replaces an old one; result.json, the record, goes last.
    atomic_write_many(
        [
            (out / "grid.png", grid_png([reference, accelerated, diff])),
            (out / "result.json", json_bytes(result)),
        ]
    )
    return result
