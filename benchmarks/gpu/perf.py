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
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import stepcache
from stepcache._env import environment
from stepcache._io import atomic_write_json
from stepcache.bench.harness import _flops, _timed, beyond_ideal, speedup_interval
from stepcache.bench.peer_hooks import _CacheDitPeer
from stepcache.bench.syncs import HostSyncCounter

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Arch:
    """One architecture: its diffusers class, configs per size, and its call's inputs."""

    cls: str
    configs: dict[str, dict[str, Any]]
    inputs: Callable[[Any, str], dict[str, torch.Tensor]]  # (config, size) -> batch-1 inputs
    hidden: str = "hidden_states"
    timestep_scale: float = 1000.0  # FLUX takes sigma itself


def _flux_inputs(c: Any, size: str) -> dict[str, torch.Tensor]:
    tokens, text = {"full": (4096, 512), "medium": (256, 64), "tiny": (16, 8)}[size]
    side = int(tokens**0.5)
    grid = torch.meshgrid(torch.zeros(1), torch.arange(side * 1.0), torch.arange(side * 1.0), indexing="ij")
    return {
        "hidden_states": _randn(1, tokens, c.in_channels),
        "encoder_hidden_states": _randn(1, text, c.joint_attention_dim),
        "pooled_projections": _randn(1, c.pooled_projection_dim),
        "img_ids": torch.stack(grid, -1).reshape(-1, 3),
        "txt_ids": torch.zeros(text, 3),
        "guidance": torch.full((1,), 3.5),
    }


def _dit_inputs(c: Any, size: str) -> dict[str, torch.Tensor]:
    return {
        "hidden_states": _randn(1, c.in_channels, c.sample_size, c.sample_size),
        "class_labels": torch.tensor([207 % c.num_embeds_ada_norm]),
    }


def _sd3_inputs(c: Any, size: str) -> dict[str, torch.Tensor]:
    latent, text = {"full": (128, 333), "medium": (32, 64), "tiny": (8, 5)}[size]  # 333 = 77 CLIP + 256 T5
    return {
        "hidden_states": _randn(1, c.in_channels, latent, latent),
        "encoder_hidden_states": _randn(1, text, c.joint_attention_dim),
        "pooled_projections": _randn(1, c.pooled_projection_dim),
    }


def _pixart_inputs(c: Any, size: str) -> dict[str, Any]:
    text = {"full": 120, "medium": 64, "tiny": 5}[size]
    extra = None
    if c.use_additional_conditions:  # PixArt-alpha 1024 conditions on resolution and aspect ratio
        side = 8.0 * c.sample_size
        extra = {"resolution": torch.tensor([[side, side]]), "aspect_ratio": torch.tensor([[1.0]])}
    return {
        "hidden_states": _randn(1, c.in_channels, c.sample_size, c.sample_size),
        "encoder_hidden_states": _randn(1, text, c.caption_channels),
        "added_cond_kwargs": extra or {"resolution": None, "aspect_ratio": None},
    }


def _unet_inputs(c: Any, size: str) -> dict[str, torch.Tensor]:
    return {
        "sample": _randn(1, c.in_channels, c.sample_size, c.sample_size),
        "encoder_hidden_states": _randn(1, 77 if size != "tiny" else 5, c.cross_attention_dim),
    }


def _wan_inputs(c: Any, size: str) -> dict[str, torch.Tensor]:
    # full: 17 frames of 480x832 -> latent 5 x 60 x 104 (VAE 4x temporal, 8x spatial)
    frames, height, width = {"full": (5, 60, 104), "medium": (3, 16, 16), "tiny": (2, 4, 4)}[size]
    text = {"full": 512, "medium": 64, "tiny": 5}[size]
    return {
        "hidden_states": _randn(1, c.in_channels, frames, height, width),
        "encoder_hidden_states": _randn(1, text, c.text_dim),
    }


ARCHS: dict[str, Arch] = {
    "flux": Arch(  # FLUX.1-dev; medium = 3 double + 6 single blocks at width 1024
        "FluxTransformer2DModel",
        {
            "full": dict(
                num_layers=19,
                num_single_layers=38,
                num_attention_heads=24,
                joint_attention_dim=4096,
                in_channels=64,
                guidance_embeds=True,
            ),
            "medium": dict(
                num_layers=3,
                num_single_layers=6,
                num_attention_heads=8,
                joint_attention_dim=1024,
                in_channels=64,
                guidance_embeds=True,
            ),
            "tiny": dict(
                in_channels=64,
                guidance_embeds=True,
                num_layers=1,
                num_single_layers=2,
                num_attention_heads=2,
                attention_head_dim=16,
                joint_attention_dim=32,
                pooled_projection_dim=16,
                axes_dims_rope=(4, 6, 6),
            ),
        },
        _flux_inputs,
        timestep_scale=1.0,
    ),
    "dit": Arch(  # DiT-XL/2 at 256 (latent 32); medium is the real model
        "DiTTransformer2DModel",
        {
            size: dict(in_channels=4, out_channels=8, patch_size=2, num_embeds_ada_norm=1000, **cfg)
            for size, cfg in {
                "full": dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, sample_size=32),
                "medium": dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, sample_size=32),
                "tiny": dict(num_layers=3, num_attention_heads=2, attention_head_dim=8, sample_size=8),
            }.items()
        },
        _dit_inputs,
    ),
    "sd3": Arch(  # SD3-medium at 1024 (latent 128); medium = 6 blocks at width 1024, latent 32
        "SD3Transformer2DModel",
        {
            "full": dict(
                num_layers=24,
                attention_head_dim=64,
                num_attention_heads=24,
                caption_projection_dim=1536,
                pos_embed_max_size=192,
            ),
            "medium": dict(
                num_layers=6,
                attention_head_dim=64,
                num_attention_heads=16,
                caption_projection_dim=1024,
                joint_attention_dim=1024,
            ),
            "tiny": dict(
                sample_size=8,
                in_channels=4,
                out_channels=4,
                num_layers=2,
                attention_head_dim=8,
                num_attention_heads=2,
                joint_attention_dim=16,
                caption_projection_dim=16,
                pooled_projection_dim=12,
                pos_embed_max_size=16,
            ),
        },
        _sd3_inputs,
    ),
    "pixart": Arch(  # PixArt-alpha at 1024 (latent 128); medium = 6 blocks at width 1152, latent 32
        "PixArtTransformer2DModel",
        {
            "full": dict(
                num_layers=28,
                num_attention_heads=16,
                attention_head_dim=72,
                sample_size=128,
                caption_channels=4096,
                cross_attention_dim=1152,
                use_additional_conditions=True,
            ),
            "medium": dict(
                num_layers=6,
                num_attention_heads=16,
                attention_head_dim=72,
                sample_size=32,
                caption_channels=1024,
                cross_attention_dim=1152,
                use_additional_conditions=False,
            ),
            "tiny": dict(
                num_layers=2,
                num_attention_heads=2,
                attention_head_dim=8,
                sample_size=8,
                caption_channels=12,
                cross_attention_dim=16,
                use_additional_conditions=False,
            ),
        },
        _pixart_inputs,
    ),
    "unet": Arch(  # Stable Diffusion 1.5's U-Net at 512 (latent 64); medium = half width, latent 32
        "UNet2DConditionModel",
        {
            "full": dict(sample_size=64, cross_attention_dim=768),
            "medium": dict(sample_size=32, cross_attention_dim=768, block_out_channels=(160, 320, 640, 640)),
            "tiny": dict(
                sample_size=8,
                cross_attention_dim=16,
                block_out_channels=(32, 64),
                layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                attention_head_dim=4,
                norm_num_groups=8,
            ),
        },
        _unet_inputs,
        hidden="sample",
    ),
    "wan": Arch(  # Wan 2.1 T2V 1.3B, a 17-frame 480x832 clip; medium = 4 blocks, 3 x 16 x 16 latent
        "WanTransformer3DModel",
        {
            "full": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
            "medium": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=4),
            "tiny": dict(
                num_attention_heads=2,
                attention_head_dim=8,
                in_channels=4,
                out_channels=4,
                text_dim=12,
                freq_dim=16,
                ffn_dim=32,
                num_layers=2,
                rope_max_seq_len=32,
            ),
        },
        _wan_inputs,
    ),
}


def _f1b0(rdt: float) -> dict[str, Any]:
    """cache-dit DBCache F1B0 at this threshold, after one warm-up step."""
    return {
        "Fn_compute_blocks": 1,
        "Bn_compute_blocks": 0,
        "residual_diff_threshold": rdt,
        "max_warmup_steps": 1,
        "enable_separate_cfg": False,  # one call per step here
    }


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_GEN)


_GEN = torch.Generator()


def build(
    arch: str, size: str, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, Callable[[], dict[str, Any]]]:
    """The model, built on ``device`` in ``dtype``, and a function giving one call's inputs."""
    import diffusers

    if arch not in ARCHS:
        raise SystemExit(f"unknown arch {arch!r}: one of {', '.join(ARCHS)}")
    spec = ARCHS[arch]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:  # built where it runs: full FLUX in float32 on the host first would need 48 GB
        with torch.device(device):
            model = getattr(diffusers, spec.cls)(**spec.configs[size]).eval()
    finally:
        torch.set_default_dtype(previous)
    if device != "meta":
        with torch.no_grad():  # some output layers start at zero; timing wants real arithmetic
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)

    def inputs() -> dict[str, Any]:
        _GEN.manual_seed(0)
        return spec.inputs(model.config, size)

    return model, inputs


def meta_syncs(arch: str, size: str, policy: Any, steps: int) -> dict[str, Any]:
    """Host syncs of one generation under ``policy``, counted on the meta device (no arithmetic,
    every read of a device value caught): per step, and by kind of read."""
    model, inputs = build(arch, size, "meta")
    handle = stepcache.enable(model, policy) if policy is not None else None
    try:
        # meta tensors hold no values: the end-of-generation finiteness read sees garbage
        with HostSyncCounter() as counter, warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", "stepcache: the (model's own|denoiser's) output", RuntimeWarning
            )
            euler(model, arch, inputs, steps, "meta", handle=handle)
    finally:
        stepcache.disable(model)
    return {"host_syncs_per_step": counter.count / steps, "calls": dict(counter.calls)}


def euler(
    model: torch.nn.Module,
    arch: str,
    inputs: Callable[[], dict[str, Any]],
    steps: int,
    device: str,
    dtype: torch.dtype = torch.float32,
    handle: Any = None,
    context: Callable[[], Any] = contextlib.nullcontext,
) -> torch.Tensor:
    spec = ARCHS[arch]
    kw = {k: _to(v, device, dtype) for k, v in inputs().items()}
    x = kw.pop(spec.hidden)
    scope = handle.generation(num_steps=steps) if handle is not None else contextlib.nullcontext()
    with torch.no_grad(), scope:
        for i in range(steps):
            sigma = 1 - i / steps
            t = torch.full((x.shape[0],), sigma * spec.timestep_scale, device=device)
            with context():
                out = model(**{spec.hidden: x}, timestep=t, **kw)[0]
            x = x - out[:, : x.shape[1]] / steps  # DiT and PixArt also predict a variance
    return x


def _to(v: Any, device: str, dtype: torch.dtype) -> Any:
    if isinstance(v, dict):
        return {k: _to(u, device, dtype) for k, u in v.items()}
    if isinstance(v, torch.Tensor):
        return v.to(device, dtype) if torch.is_floating_point(v) else v.to(device)
    return v


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
        ("deepcache interval 3", stepcache.presets.get("deepcache", interval=3)),  # U-Nets only
        # token caching (non-rotary transformers): every token each step (the token path's
        # overhead), a quarter of the tokens on every step after the first (a token step's
        # efficiency), and the preset
        ("toca every token", stepcache.presets.get("toca", ratio=1.0)),
        ("toca 25% of tokens", stepcache.presets.get("toca", ratio=0.25, warmup=1, interval=1000)),
        ("toca preset", stepcache.presets.get("toca")),
    ]


def peer_runs(model: torch.nn.Module) -> list[dict[str, Any]]:
    """The peers' first-block caches beside ours: never skipping (pure overhead) and skipping
    every step they may (efficiency), each checking from the second step as ours does."""
    runs: list[dict[str, Any]] = []
    if hasattr(model, "enable_cache"):  # diffusers' own FirstBlockCache (models with CacheMixin)
        for name, threshold in (("never skips", 0.0), ("skips all it can", 1e9)):
            runs.append(
                {"policy": f"diffusers FirstBlockCache {name}", "peer": "diffusers", "threshold": threshold}
            )
    for name, rdt in (("never skips", 0.0), ("skips all it can", 1e9)):
        runs.append({"policy": f"cache-dit DBCache F1B0 {name}", "peer": "cache-dit", "rdt": rdt})
    return runs


def attach(model: torch.nn.Module, run: dict[str, Any]) -> tuple[Any, Callable[[], Any], Callable[[], Any]]:
    """Attach one run's method; returns (stepcache handle or None, per-call context,
    per-generation context)."""
    none = contextlib.nullcontext
    if run["peer"] == "diffusers":
        from diffusers.hooks import FirstBlockCacheConfig

        model.enable_cache(FirstBlockCacheConfig(threshold=run["threshold"]))
        return None, lambda: model.cache_context("cond"), none
    if run["peer"] == "cache-dit":
        import cache_dit

        if not cache_dit.BlockAdapterRegister.is_supported(model):
            raise ValueError(
                f"cache-dit {cache_dit.__version__} has no block adapter for {type(model).__name__}"
            )
        peer = run.setdefault("impl", _CacheDitPeer(_f1b0(run["rdt"])))
        peer.attach(model, run["policy"])
        return None, none, lambda: peer.generation(model, run["policy"])
    handle = stepcache.enable(model, run["pol"]) if run["pol"] is not None else None
    return handle, none, none


def detach(model: torch.nn.Module, run: dict[str, Any]) -> None:
    if run["peer"] == "diffusers":
        model.disable_cache()
    elif run["peer"] == "cache-dit":
        run["impl"].detach(model)
    else:
        stepcache.disable(model)


def compiled_rows(
    model: torch.nn.Module, generate: Callable, eager_rows: list[dict[str, Any]], repeats: int, steps: int
) -> list[dict[str, Any]]:
    """Compiled without stepcache (``torch.compile(model)``) against compiled with a policy
    (``handle.compile()``: the network compiles, the runtime's decisions stay eager), interleaved.
    ``kept`` is the compiled speedup over the eager speedup of the same policy."""
    compiled_plain = torch.compile(model)
    cases: list[tuple[str, Any, str]] = [("compiled, no stepcache", None, "no stepcache")]
    eager = {r["policy"]: r for r in eager_rows}
    candidates = [
        ("static interval 2", stepcache.presets.get("static-interval", interval=2)),
        ("fbcache skips all it can", stepcache.presets.get("fbcache", threshold=10.0, max_consecutive=10**4)),
        ("deepcache interval 3", stepcache.presets.get("deepcache", interval=3)),
    ]
    # only what ran eagerly on this model (fbcache needs a block stack, DeepCache a U-Net)
    cases += [(f"compiled, {name}", pol, name) for name, pol in candidates if name in eager]

    def run(case: tuple[str, Any, str]) -> float:
        name, pol, _ = case
        if pol is None:
            return _timed(lambda: generate(model_override=compiled_plain))[1]
        handle = stepcache.enable(model, pol).compile()
        try:
            return _timed(lambda: generate(handle))[1]
        finally:
            stepcache.disable(model)

    times: dict[str, list[float]] = {c[0]: [] for c in cases}
    for case in cases:
        run(case)  # compiles; the inductor cache makes later attaches cheap
    for _ in range(repeats):
        for case in cases:
            times[case[0]].append(run(case))
    plain = statistics.median(times[cases[0][0]])
    out = []
    for name, pol, eager_name in cases:
        med = statistics.median(times[name])
        row: dict[str, Any] = {"policy": name, "peer": None, "compiled": True, "step_ms": 1000 * med / steps}
        if pol is not None:
            speedup = plain / med
            row.update(
                speedup=speedup,
                speedup_interval=speedup_interval(times[cases[0][0]], times[name]),
                ideal_speedup=eager[eager_name]["ideal_speedup"],
                efficiency=speedup / eager[eager_name]["ideal_speedup"],
                eager_speedup=eager[eager_name]["speedup"],
                kept=speedup / eager[eager_name]["speedup"],
            )
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", default="flux")
    ap.add_argument("--size", default="medium", choices=("tiny", "medium", "full"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--only", default=None, help="comma-separated words: run only the policies whose name has one"
    )
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" and args.size == "full" else torch.float32
    model, inputs = build(args.arch, args.size, device, dtype)
    steps = args.steps

    def generate(
        handle: Any = None,
        context: Callable = contextlib.nullcontext,
        scope: Callable = contextlib.nullcontext,
        model_override: Any = None,
    ) -> torch.Tensor:
        if getattr(model, "is_cache_enabled", False):
            # diffusers' hooks keep their cache across calls of a hand-written loop; a generation
            # must start fresh, as its pipelines do, or its first step answers from the last run.
            model._reset_stateful_cache()
        runner = model if model_override is None else model_override
        with scope():  # cache-dit: a fresh cache context per generation
            return euler(runner, args.arch, inputs, steps, device, dtype, handle, context)

    runs = [{"policy": name, "peer": None, "pol": pol} for name, pol in policies(steps)] + peer_runs(model)
    if args.only:  # the baseline stays: every speedup is over it
        words = args.only.split(",")
        runs = [r for r in runs if r["policy"] == "no stepcache" or any(w in r["policy"] for w in words)]
    unavailable: list[dict[str, str]] = []
    for run in list(runs):  # FLOPs and host syncs, untimed
        try:
            handle, ctx, scope = attach(model, run)
        except (stepcache.UnsupportedModelError, ImportError, ValueError) as e:
            runs.remove(run)
            unavailable.append({"policy": run["policy"], "reason": str(e)})
            continue
        try:
            generate(handle, ctx, scope)  # warm-up; some refusals come at the first call
        except stepcache.UnsupportedModelError as e:
            detach(model, run)
            runs.remove(run)
            unavailable.append({"policy": run["policy"], "reason": str(e)})
            continue
        run["flops"] = _flops(lambda h=handle, c=ctx, g=scope: generate(h, c, g))
        detach(model, run)
        if run["peer"] is None:
            run["host_syncs_per_step"] = meta_syncs(args.arch, args.size, run["pol"], steps)[
                "host_syncs_per_step"
            ]
    times: dict[str, list[float]] = {r["policy"]: [] for r in runs}
    for _ in range(args.repeats):  # interleaved, so drift hits every policy alike
        for run in runs:
            handle, ctx, scope = attach(model, run)
            times[run["policy"]].append(_timed(lambda h=handle, c=ctx, g=scope: generate(h, c, g))[1])
            detach(model, run)
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
                "speedup_interval": speedup_interval(times["no stepcache"], times[run["policy"]]),
                "beyond_ideal": beyond_ideal(times["no stepcache"], times[run["policy"]], ideal),
                "ideal_speedup": ideal,
                "efficiency": (base / med) / ideal,
                "overhead_pct": 100 * (med / base - 1) if abs(ideal - 1) < 1e-9 else None,
                "host_syncs_per_step": run.get("host_syncs_per_step"),
            }
        )
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
        "unavailable": unavailable,
    }
    if device == "cuda":
        doc["gpu"] = torch.cuda.get_device_name()
    where = "gpu" if device == "cuda" else "cpu"
    out = (
        Path(args.out)
        if args.out
        else ROOT / "benchmarks" / "results" / where / f"perf-{args.arch}-{args.size}.json"
    )
    atomic_write_json(out, doc)  # the eager rows stand even if compiling is cut short
    if args.compile:
        rows += compiled_rows(model, generate, rows, args.repeats, steps)
        atomic_write_json(out, doc)
    for r in rows:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    print(out)
    return doc


if __name__ == "__main__":
    main()
