"""Token caching against its controls, at equal FLOPs, on one zoo model.

For each share of tokens (``ratio``) on the steps between full ones (every 3rd after a 2-step
warm-up): the tokens whose input moved most (the method), the same number of tokens drawn at
random per sample and step (does the choice matter?), and the same FLOPs spent on whole steps
instead: the block stack on evenly spread extra steps, its residual reused (order 0) or forecast
(order 2) between them. PSNR vs full compute on the 16 held-out seeds (10_000..); FLOP fraction
from torch.utils.flop_counter.

Writes benchmarks/results/toca-MODEL.json and docs/toca-MODEL.png.
Run: python benchmarks/toca.py --model fmnist-dit   (--plot-only: redraw from the JSON)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import stepcache
from stepcache import metrics, presets, zoo
from stepcache._env import environment
from stepcache._io import atomic_write_json
from stepcache.adapters import adapter_for
from stepcache.bench.harness import _flops, _flops_and_images
from stepcache.methods.block.toca import TokenCache
from stepcache.runtime import RuleSet, attach, detach

ROOT = Path(__file__).resolve().parent.parent
INTERVAL, WARMUP = 3, 2


class RandomTokens(TokenCache):
    """The control: as many tokens, drawn uniformly per sample and step."""

    def plan(self, ctx, state, block_in):
        chosen = super().plan(ctx, state, block_in)
        if chosen is None:
            return None
        g = torch.Generator().manual_seed(1000 * ctx.step + ctx.branch)
        n = block_in[0].shape[1]
        picks = torch.stack([torch.randperm(n, generator=g)[: chosen.shape[1]] for _ in range(len(chosen))])
        return picks.sort(dim=1).values.to(chosen.device)


def spread_mask(steps: int, computed: int) -> list[bool]:
    """The warm-up and step 2 computed (as the token schedule), the rest spread evenly."""
    head = WARMUP + 1
    mask = [i < head for i in range(steps)]
    extra = max(0, min(steps - head, computed - head))
    for k in range(extra):
        mask[head + round(k * (steps - head) / extra)] = True
    return mask


def plot(doc: dict, path: Path) -> None:
    """PSNR against FLOP speedup, one line per kind of run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in dict.fromkeys(r["tokens"] for r in doc["runs"]):
        runs = sorted((r for r in doc["runs"] if r["tokens"] == kind), key=lambda r: r["flop_fraction"])
        ax.plot([1 / r["flop_fraction"] for r in runs], [r["psnr"] for r in runs], "o-", label=kind)
    ax.set_xlabel("FLOP speedup (full compute / run)")
    ax.set_ylabel("PSNR vs full compute (dB)")
    ax.set_title(f"{doc['model']}: token caching vs its controls")
    ax.grid(alpha=0.3)
    ax.legend(title="between the full steps: tokens, or whole steps instead", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="fmnist-dit")
    ap.add_argument("--ratios", default="0,0.15,0.3,0.5,0.7")
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args()
    result = ROOT / "benchmarks" / "results" / f"toca-{args.model}.json"
    figure = ROOT / "docs" / f"toca-{args.model}.png"
    if args.plot_only:
        plot(json.loads(result.read_text()), figure)
        return
    pipe = zoo.load(args.model)
    model = pipe.transformer
    text = zoo.spec(args.model).conditioning == "text"
    if text:
        from stepcache.zoo.text import DEMO_PROMPTS

        labels = [DEMO_PROMPTS[i % len(DEMO_PROMPTS)] for i in range(16)]
    else:
        labels = [i % 10 for i in range(16)]
    steps = pipe.default_steps

    def generate():
        gens = [torch.Generator().manual_seed(10_000 + i) for i in range(16)]
        cond = {"prompt": labels} if text else {"class_labels": labels}
        return pipe(
            **cond, num_inference_steps=steps, guidance_scale=pipe.default_guidance, generator=gens
        ).images

    reference = generate()
    full_flops = _flops(generate)

    def measure(start: Callable[[], Any], stop: Callable[[], Any]) -> dict[str, float]:
        start()
        try:
            images, flops = _flops_and_images(generate)
        finally:
            stop()
        psnr = float(metrics.psnr_per_image(images, reference).mean())
        return {"flop_fraction": flops / full_flops, "psnr": psnr}

    rows = []
    for ratio in (float(r) for r in args.ratios.split(",")):
        params = {"ratio": ratio, "interval": INTERVAL, "warmup": WARMUP, "fn": 0, "bn": 0}
        for name, rule in (("changed most", TokenCache), ("random", RandomTokens)):
            rules = RuleSet(block=rule(**params))
            result = measure(
                lambda r=rules: attach(pipe, model, adapter_for(model), r, None), lambda: detach(model)
            )
            rows.append({"ratio": ratio, "tokens": name, **result})
            print(rows[-1], flush=True)
        mask = spread_mask(steps, round(rows[-2]["flop_fraction"] * steps))
        for order in (0, 2):
            policy = presets.get("taylorseer-feature", mask=mask, order=order, fn=0, bn=0)
            result = measure(lambda p=policy: stepcache.enable(pipe, p), lambda: stepcache.disable(pipe))
            rows.append({"ratio": ratio, "tokens": f"whole steps, order {order}", "mask": mask, **result})
            print(rows[-1], flush=True)
    doc = {
        "benchmark": "toca",
        "model": args.model,
        **environment(ROOT),
        "command": "python " + " ".join(sys.argv),
        "protocol": {"seeds": [10_000, 10_015], "interval": INTERVAL, "warmup": WARMUP, "steps": steps},
        "runs": rows,
    }
    atomic_write_json(result, doc)
    plot(doc, figure)


if __name__ == "__main__":
    main()
