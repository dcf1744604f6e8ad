"""Runtime cost on real-size architectures: overhead, efficiency against the FLOP ideal, host
syncs, torch.compile, and diffusers' FirstBlockCache beside stepcache, in one process.

Architectures come from their public configs with random weights (timing does not depend on the
values): FLUX.1-dev's transformer and DiT-XL/2 at 256. ``--size full`` is the real model (for a
GPU, bf16); ``medium`` the CPU stand-in (FLUX: 3 double + 6 single blocks at width 1024 with
256 image + 64 text tokens; DiT-XL/2 itself, fp32); ``tiny`` a few-block model for the tests.

Per policy, in a bare Euler loop of ``--steps`` steps, interleaved ``--repeats`` times:
``step_ms`` (median), ``speedup`` over no stepcache, ``ideal_speedup`` (FLOP ratio, from
torch.utils.flop_counter), ``efficiency`` = speedup / ideal, ``overhead_pct`` (policies that
compute everything), ``host_syncs_per_step`` (counted on the meta device, see
stepcache.bench.syncs). With ``--compile`` also the compiled model, with and without a policy.

Writes benchmarks/results/{gpu,cpu}/perf-ARCH-SIZE.json.
Run: OMP_NUM_THREADS=2 python benchmarks/gpu/perf.py --arch flux --size medium [--compile]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import stepcache
from stepcache._env import environment
from stepcache._io import atomic_write_json
from stepcache.bench.harness import _flops, _timed
from stepcache.bench.syncs import HostSyncCounter

ROOT = Path(__file__).resolve().parents[2]


def build(arch: str, size: str) -> tuple[torch.nn.Module, Callable[[str, int], dict[str, Any]]]:
    """The model and a function giving one call's inputs on a device (batch 1) at step i."""
    from diffusers import DiTTransformer2DModel, FluxTransformer2DModel

    if arch == "flux":
        cfg = {
            "full": dict(
                num_layers=19, num_single_layers=38, num_attention_heads=24, joint_attention_dim=4096
            ),
            "medium": dict(
                num_layers=3, num_single_layers=6, num_attention_heads=8, joint_attention_dim=1024
            ),
            "tiny": dict(
                num_layers=1,
                num_single_layers=2,
                num_attention_heads=2,
                attention_head_dim=16,
                joint_attention_dim=32,
                pooled_projection_dim=16,
                axes_dims_rope=(4, 6, 6),
            ),
        }[size]
        tokens, text = {"full": (4096, 512), "medium": (256, 64), "tiny": (16, 8)}[size]
        model = FluxTransformer2DModel(in_channels=64, guidance_embeds=True, **cfg)
        c = model.config

        def inputs(device: str, i: int) -> dict[str, Any]:
            g = torch.Generator().manual_seed(0)
            side = int(tokens**0.5)
            ids = torch.stack(
                torch.meshgrid(
                    torch.zeros(1), torch.arange(side * 1.0), torch.arange(side * 1.0), indexing="ij"
                ),
                -1,
            ).reshape(-1, 3)
            return {
                "hidden_states": torch.randn(1, tokens, c.in_channels, generator=g),
                "encoder_hidden_states": torch.randn(1, text, c.joint_attention_dim, generator=g),
                "pooled_projections": torch.randn(1, c.pooled_projection_dim, generator=g),
                "img_ids": ids,
                "txt_ids": torch.zeros(text, 3),
                "guidance": torch.full((1,), 3.5),
            }

        return model, inputs
    if arch == "dit":
        cfg = {
            "full": dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, sample_size=32),
            "medium": dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, sample_size=32),
            "tiny": dict(num_layers=3, num_attention_heads=2, attention_head_dim=8, sample_size=8),
        }[size]
        model = DiTTransformer2DModel(
            in_channels=4, out_channels=8, patch_size=2, num_embeds_ada_norm=1000, **cfg
        )

        def inputs(device: str, i: int) -> dict[str, Any]:
            g = torch.Generator().manual_seed(0)
            s = model.config.sample_size
            return {
                "hidden_states": torch.randn(1, 4, s, s, generator=g),
                "class_labels": torch.tensor([207]),
            }

        return model, inputs
    raise SystemExit(f"unknown arch {arch!r}: flux or dit")


def euler(
    model: torch.nn.Module,
    inputs: Callable,
    steps: int,
    device: str,
    handle: Any = None,
    context: Callable[[], Any] = contextlib.nullcontext,
) -> torch.Tensor:
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs(device, 0).items()}
    x = kw.pop("hidden_states")
    scope = handle.generation(num_steps=steps) if handle is not None else contextlib.nullcontext()
    flux = "img_ids" in kw
    with torch.no_grad(), scope:
        for i in range(steps):
            sigma = 1 - i / steps
            t = torch.full((x.shape[0],), sigma if flux else sigma * 1000, device=device)
            with context():
                out = model(hidden_states=x, timestep=t, **kw)[0]
            out = out[:, : x.shape[1]] if not flux else out  # DiT predicts mean and variance
            x = x - out / steps
    return x


def policies(steps: int) -> list[tuple[str, Any]]:
    big = 10**4
    return [
        ("no stepcache", None),
        ("always compute", stepcache.presets.get("static-interval", interval=1)),
        ("static interval 2", stepcache.presets.get("static-interval", interval=2)),
        ("static interval 3", stepcache.presets.get("static-interval", interval=3)),
        ("static interval 4", stepcache.presets.get("static-interval", interval=4)),
        ("fbcache never skips", stepcache.presets.get("fbcache", threshold=0.0)),
        ("fbcache skips all it can", stepcache.presets.get("fbcache", threshold=10.0, max_consecutive=big)),
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", default="flux")
    ap.add_argument("--size", default="medium", choices=("tiny", "medium", "full"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" and args.size == "full" else torch.float32
    model, inputs = build(args.arch, args.size)
    model = model.to(device, dtype).eval()
    steps = args.steps

    def generate(handle: Any = None, context: Callable = contextlib.nullcontext) -> torch.Tensor:
        if getattr(model, "is_cache_enabled", False):
            # diffusers' hooks keep their cache across calls of a hand-written loop; a generation
            # must start fresh, as its pipelines do, or its first step answers from the last run.
            model._reset_stateful_cache()
        return euler(
            model,
            lambda d, i: {
                k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in inputs(d, i).items()
            },
            steps,
            device,
            handle,
            context,
        )

    runs: list[dict[str, Any]] = []
    for name, pol in policies(steps):
        runs.append({"policy": name, "peer": None, "pol": pol})
    if hasattr(model, "enable_cache"):  # diffusers' own FirstBlockCache, same loop, same process
        for name, threshold in (
            ("diffusers FirstBlockCache never skips", 0.0),
            ("diffusers FirstBlockCache skips all it can", 1e9),
        ):
            runs.append({"policy": name, "peer": "diffusers", "threshold": threshold})

    def attach(run: dict[str, Any]) -> tuple[Any, Callable]:
        if run.get("peer") == "diffusers":
            from diffusers.hooks import FirstBlockCacheConfig

            model.enable_cache(FirstBlockCacheConfig(threshold=run["threshold"]))
            return None, lambda: model.cache_context("cond")
        handle = stepcache.enable(model, run["pol"]) if run["pol"] is not None else None
        return handle, contextlib.nullcontext

    def detach(run: dict[str, Any]) -> None:
        if run.get("peer") == "diffusers":
            model.disable_cache()
        else:
            stepcache.disable(model)

    for run in runs:  # FLOPs and host syncs, untimed
        handle, ctx = attach(run)
        generate(handle, ctx)  # warm-up
        run["flops"] = _flops(lambda h=handle, c=ctx: generate(h, c))
        detach(run)
        if run.get("peer") is None:
            meta_model = build(args.arch, args.size)[0].to("meta")
            h = stepcache.enable(meta_model, run["pol"]) if run["pol"] is not None else None
            with HostSyncCounter() as counter:
                euler(meta_model, inputs, steps, "meta", h)
            run["host_syncs_per_step"] = counter.count / steps
            if h is not None:
                stepcache.disable(meta_model)
    times: dict[str, list[float]] = {r["policy"]: [] for r in runs}
    for _ in range(args.repeats):  # interleaved, so drift hits every policy alike
        for run in runs:
            handle, ctx = attach(run)
            times[run["policy"]].append(_timed(lambda h=handle, c=ctx: generate(h, c))[1])
            detach(run)
    base = statistics.median(times["no stepcache"])
    base_flops = runs[0]["flops"]
    rows = []
    for run in runs:
        med = statistics.median(times[run["policy"]])
        ideal = base_flops / run["flops"]
        rows.append(
            {
                "policy": run["policy"],
                "peer": run.get("peer"),
                "compiled": False,
                "step_ms": 1000 * med / steps,
                "speedup": base / med,
                "ideal_speedup": ideal,
                "efficiency": (base / med) / ideal,
                "overhead_pct": 100 * (med / base - 1) if abs(ideal - 1) < 1e-9 else None,
                "host_syncs_per_step": run.get("host_syncs_per_step"),
            }
        )
    if args.compile:
        eager_model = model
        for name, pol in (
            ("compiled, no stepcache", None),
            ("compiled, static interval 2", stepcache.presets.get("static-interval")),
        ):
            # stepcache first, then compile: its wrappers are traced with the model
            handle = stepcache.enable(eager_model, pol) if pol is not None else None
            model = torch.compile(eager_model)
            generate(handle)  # compiles
            t = statistics.median(_timed(lambda h=handle: generate(h))[1] for _ in range(args.repeats))
            if handle is not None:
                stepcache.disable(eager_model)
            torch._dynamo.reset()
            rows.append({"policy": name, "peer": None, "compiled": True, "step_ms": 1000 * t / steps})
        plain, cached = rows[-2]["step_ms"], rows[-1]["step_ms"]
        eager = next(r for r in rows if r["policy"] == "static interval 2")["speedup"]
        rows[-1].update(speedup=plain / cached, eager_speedup=eager, kept=(plain / cached) / eager)
    doc = {
        "benchmark": "perf",
        "arch": args.arch,
        "size": args.size,
        **environment(ROOT),
        "dtype": str(dtype).replace("torch.", ""),
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "steps": steps,
        "repeats": args.repeats,
        "rows": rows,
    }
    where = "gpu" if device == "cuda" else "cpu"
    out = (
        Path(args.out)
        if args.out
        else ROOT / "benchmarks" / "results" / where / f"perf-{args.arch}-{args.size}.json"
    )
    atomic_write_json(out, doc)
    for r in rows:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    print(out)
    return doc


if __name__ == "__main__":
    main()
