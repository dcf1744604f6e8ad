"""Measure accelerations side by side on one model, seeds, steps and guidance (DESIGN.md §5).

Each candidate (the reference itself, a stepcache policy, a peer setting) runs on the same batch
of evaluation seeds. Per candidate: a warm-up run (excluded from timing) gives its images and its
per-step actions, one run under torch's FLOP counter gives its FLOPs, then ``repeats`` timed runs
interleaved with timed reference runs give the median latency of each; the speedup is their ratio.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import _io, zoo
from .._env import environment
from .._limits import MAX_EVAL_SEEDS, MAX_GUIDANCE, MAX_REPEATS, MAX_STEPS, check_float, check_int
from ..api import PolicyLike, disable, enable, resolve_policy
from ..errors import PolicyError, UnsupportedModelError
from ..metrics import bootstrap_ci, frechet_distance, psnr_per_image, ssim_per_image
from ..policy import Policy, check_name

EVAL_SEED_BASE = 10_000  # evaluation seeds are 10_000 + i; calibration and search use 0..K-1
GRID_SAMPLES = 8  # images per run kept for the report's sample grid
BENCH_FILES = ("result.json", "samples.safetensors", "report.html")


@dataclass
class Candidate:
    """One thing to measure. ``attach`` returns the stepcache handle when there is one."""

    name: str
    kind: str  # "reference" | "stepcache" | "peer"
    params: dict[str, Any]
    attach: Callable[[Any], Any] = lambda pipe: None
    detach: Callable[[Any], None] = lambda pipe: None
    generation: Callable[[Any], contextlib.AbstractContextManager] = lambda pipe: contextlib.nullcontext()
    peer: str | None = None


def reference_candidate() -> Candidate:
    return Candidate("reference", "reference", {})


def policy_candidate(policy: PolicyLike, name: str | None = None) -> Candidate:
    pol = resolve_policy(policy)
    return Candidate(
        name or pol.name,
        "stepcache",
        pol.to_dict(),
        attach=lambda pipe: enable(pipe, pol),
        detach=disable,
    )


def peer_candidate(run: Any) -> Candidate:
    """A Candidate from a ``bench.peers.PeerRun``."""
    return Candidate(
        run.name,
        "peer",
        dict(run.params),
        attach=lambda pipe: run.attach(pipe),
        detach=run.detach,
        generation=run.generation,
        peer=run.peer,
    )


def unsupported(pipe: Any, cand: Candidate) -> str | None:
    """Why ``cand`` cannot run on ``pipe`` (attached and detached again to find out), or None."""
    try:
        cand.attach(pipe)
    except UnsupportedModelError as e:
        return str(e)
    finally:
        cand.detach(pipe)
    return None


@dataclass
class Batch:
    """The batch every candidate generates: conditioning, seeds, steps, guidance. ``model`` names
    it in reports (a zoo key finds the zoo's judges by it); ``extra`` is passed to every call."""

    model: str
    steps: int
    guidance: float | None
    seeds: list[int]
    cond: dict[str, list]
    labels: list[int] | None = field(default=None)
    captions: list[str] | None = field(default=None)
    extra: dict[str, Any] = field(default_factory=dict)

    def generate(self, pipe: Any) -> np.ndarray:
        from ..pipelines import images_of

        # One generator per sample, so each seed's noise does not depend on the batch.
        gens = [torch.Generator().manual_seed(s) for s in self.seeds]
        kw: dict[str, Any] = {**self.cond, **self.extra, "num_inference_steps": self.steps, "generator": gens}
        if self.guidance is not None:
            kw["guidance_scale"] = self.guidance
        return images_of(pipe(**kw))


def make_batch(pipe: Any, model: str, steps: int | None, guidance: float | None, seeds: list[int]) -> Batch:
    """A zoo model's batch: its own conditioning per seed and its default steps and guidance."""
    from ..demo import conditions

    cond = conditions(pipe, len(seeds), list(seeds))
    return Batch(
        model=model,
        steps=steps or pipe.default_steps,
        guidance=pipe.default_guidance if guidance is None else guidance,
        seeds=list(seeds),
        cond=cond,
        labels=cond.get("class_labels"),
        captions=cond.get("prompt"),
    )


def workload_batch(pipe: Any, name: str, workload: Any, seeds: list[int] | tuple[int, ...]) -> Batch:
    """The user's workload on ``seeds`` of their pipeline: the workload's arguments, steps and
    guidance, or the pipeline's own defaults where the workload leaves them out."""
    from ..workload import WorkloadError, declared_default, takes

    steps = (
        workload.steps if workload.steps is not None else declared_default(pipe, "num_inference_steps", int)
    )
    if steps is None:
        raise WorkloadError(f"steps: {type(pipe).__name__} declares no default step count; set it")
    guidance = workload.guidance
    if guidance is None:
        guidance = declared_default(pipe, "guidance_scale", (int, float))
        guidance = None if guidance is None else float(guidance)
    cond = workload.cond(len(seeds))
    extra = workload.call_kwargs(pipe)
    if not cond and "batch_size" not in extra and takes(pipe, "batch_size"):
        extra["batch_size"] = len(seeds)  # an unconditional pipeline sizes its batch by this
    return Batch(
        model=name,
        steps=steps,
        guidance=guidance,
        seeds=list(seeds),
        cond=cond,
        labels=cond.get("class_labels"),
        captions=cond.get("prompt"),
        extra=extra,
    )


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Wall-clock seconds of ``fn``; on CUDA, events around a synchronised call."""
    if torch.cuda.is_available():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        return out, start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _compute_leaf(block: torch.nn.Module) -> torch.nn.Module:
    """The part of a block that only runs when the block really computes: some peers' skip hooks
    still call a skipped block and return its cached output from inside."""
    for name in ("ff", "attn1", "attn"):
        if isinstance(getattr(block, name, None), torch.nn.Module):
            return getattr(block, name)
    return block


class StepProbe:
    """Per-step record of how much of the denoiser ran, for runs that are not stepcache's own.

    Forward hooks count calls of the denoiser, of its first block's feed-forward and of its
    deepest part (the last block's feed-forward, or a U-Net's mid block). A step reads C when the
    deepest part ran, P when only the front ran, E when nothing ran (the output came from a cache).
    """

    def __init__(self, denoiser: torch.nn.Module):
        from ..adapters import adapter_for

        blocks = None
        with contextlib.suppress(Exception):
            blocks = adapter_for(denoiser).blocks()
        self.front = _compute_leaf(blocks[0]) if blocks else getattr(denoiser, "conv_in", None)
        self.deep = _compute_leaf(blocks[-1]) if blocks else getattr(denoiser, "mid_block", None)
        self.denoiser = denoiser
        self.steps: list[dict[str, int]] = []
        self._handles: list[Any] = []

    def __enter__(self) -> StepProbe:
        def on(key: str) -> Callable[..., None]:
            def hook(*_: Any) -> None:
                if key == "calls":
                    self.steps.append({"calls": 0, "front": 0, "deep": 0})
                if self.steps:
                    self.steps[-1][key] += 1

            return hook

        self._handles.append(self.denoiser.register_forward_pre_hook(on("calls")))
        for key, mod in (("front", self.front), ("deep", self.deep)):
            if mod is not None:
                self._handles.append(mod.register_forward_pre_hook(on(key)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()

    def actions(self) -> list[str]:
        return ["C" if s["deep"] else "P" if s["front"] else "E" for s in self.steps]


def _flops(fn: Callable[[], Any]) -> float:
    return _flops_and_images(fn)[1]


def _flops_and_images(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()``'s result and the FLOPs it took (torch's counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, float(counter.get_total_flops())


def _row_fraction(actions: list[str]) -> float:
    letters = "".join(actions)
    return letters.count("C") / len(letters) if letters else 1.0


def _interval(values: np.ndarray) -> list[float | None]:
    """The bootstrap interval as JSON can hold it: null bounds where there is none (every image
    identical to its reference), never NaN."""
    return [None if math.isnan(b) else b for b in bootstrap_ci(values)]


def speedup_interval(ref_times: list[float], times: list[float], seed: int = 0) -> list[float] | None:
    """95% bootstrap interval of the speedup (ratio of medians), resampling the interleaved
    (reference, candidate) timing pairs together; None with fewer than 3 pairs."""
    if len(times) < 3:
        return None
    ref, run = np.asarray(ref_times, dtype=np.float64), np.asarray(times, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(run), size=(2000, len(run)))
    ratios = np.median(ref[idx], axis=1) / np.median(run[idx], axis=1)
    lo, hi = np.quantile(ratios, [0.025, 0.975])
    return [float(lo), float(hi)]


def beyond_ideal(ref_times: list[float], times: list[float], ideal: float) -> bool:
    """Whether the measured speedup exceeds what the skipped work allows (full FLOPs over the
    run's FLOPs) by more than its noise: the whole interval, or with too few pairs for one the
    median itself, lies above the ideal. Skipped work cannot buy more time than it costs, so this
    is a measurement error (a busy machine during the reference runs), not a result."""
    ci = speedup_interval(ref_times, times)
    low = ci[0] if ci is not None else statistics.median(ref_times) / statistics.median(times)
    return low > ideal * (1 + 1e-9)


def _mean_or_inf(values: np.ndarray) -> float:
    """Mean over finite values; +inf when every image is identical to its reference."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("inf")


def adherence(model: str, images: np.ndarray, captions: list[str] | None) -> float | None:
    """For a shapes-world model, the share of images whose every criterion (count, colour, shape,
    relation or motion) the judge finds to hold; None for a model without a judge."""
    spec = zoo.spec(model) if model in zoo.names() else None
    if spec is None or spec.world != "shapes" or captions is None:
        return None
    from ..zoo.pipeline import unstrip
    from ..zoo.shapes import accuracy

    shape = spec.sample_shape or ()
    samples = unstrip(images, shape[1]) if len(shape) == 4 else images
    return accuracy(captions, samples)["all"]


class Judge:
    """Class accuracy and FD-domain for a zoo model's samples, where the model's data allows;
    prompt adherence (the shapes judge's accuracy) for the shapes-world models."""

    def __init__(self, model: str, n: int):
        from ..zoo.classifier import classifier_for

        self.model = model
        self.clf = None
        self.real_feats = None
        with contextlib.suppress(KeyError, FileNotFoundError):
            self.clf = classifier_for(model)
        if self.clf is not None and self.clf.feature_net is not None:
            from ..zoo.data import DataMissingError, load_fashion_mnist

            with contextlib.suppress(DataMissingError, FileNotFoundError):
                real, _ = load_fashion_mnist("test")
                # 4x the generated count (at least 1,000) of real images stabilises the real side.
                real = real[: max(1000, 4 * n)]
                self.real_feats = self.clf.features(((real + 1) / 2).permute(0, 2, 3, 1).numpy())

    def class_acc(self, images: np.ndarray, labels: list[int] | None) -> float | None:
        if self.clf is None or labels is None:
            return None
        return self.clf.accuracy(images, labels)

    def adherence(self, images: np.ndarray, captions: list[str] | None) -> float | None:
        return adherence(self.model, images, captions)

    def fd_domain(self, images: np.ndarray) -> float | None:
        if self.real_feats is None or len(images) < 2:
            return None
        return frechet_distance(self.real_feats, self.clf.features(images))


# What each judged metric needs; a model without it reports null, and the protocol says why.
JUDGED = {
    "class_acc": "needs a classifier of the model's classes (the zoo's class-conditional models)",
    "fd_domain": "needs a feature net of the model's domain (the zoo's Fashion-MNIST models)",
    "adherence": "needs a prompt judge (the zoo's shapes models)",
}


def skipped_metrics(rows: list[dict[str, Any]]) -> dict[str, str]:
    """The judged metrics no run could report, with what they need."""
    return {k: why for k, why in JUDGED.items() if rows and all(r.get(k) is None for r in rows)}


def check_out_dir(out_dir: str | os.PathLike, files: tuple[str, ...] = ()) -> Path:
    """Prove, before any long work starts, that ``out_dir`` can be written, and create it; each of
    ``files`` already there must be a regular file (a directory in its place is refused).

    It is created here because a search opens its sqlite storage in it before anything else is
    written; the command line checks with ``_io.check_out_dir``, which creates nothing."""
    out = _io.check_out_dir(out_dir, files)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"out: cannot create {out} ({e.strerror or e})") from None
    return out


def check_out_file(path: str | os.PathLike, what: str = "out") -> Path:
    """Prove before any long work that ``path`` can be written as a file (ValueError naming ``what``)."""
    return _io.check_out_file(path, what)


def check_args(
    model: Any,
    out_dir: str | os.PathLike | None,
    steps: int | None,
    seeds: int,
    repeats: int,
    guidance: float | None = None,
) -> Path:
    """Check a bench's arguments before anything is loaded or written; returns the out dir.

    Every size is bounded by what one batch on the machine holds (see ``_limits``)."""
    if isinstance(model, str):
        from ..pipelines import check_spec

        check_spec(model)
    check_int("seeds", seeds, 1, MAX_EVAL_SEEDS)
    check_int("repeats", repeats, 1, MAX_REPEATS)
    if steps is not None:
        check_int("steps", steps, 1, MAX_STEPS)
    if guidance is not None:
        check_float("guidance", guidance, 0.0, MAX_GUIDANCE)
    return check_out_dir(out_dir) if out_dir is not None else None


def check_run_names(candidates: list[Candidate]) -> None:
    """Refuse duplicate run names and the reserved ones ("reference", "__..."), before any work."""
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise ValueError(f"runs: names must be unique, got {names}")
    for cand in candidates:
        if cand.kind != "reference":
            try:
                check_name(cand.name, f"run name {cand.name!r}")
            except PolicyError as e:
                raise ValueError(str(e)) from None


def measure(
    pipe: Any,
    work: Batch,
    candidates: list[Candidate],
    repeats: int = 5,
    progress: Callable[[str, int, int], None] | None = None,
    failed: list[dict[str, str]] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Measure every candidate on ``work``; returns the run rows and each run's first images.

    A peer whose generation raises is not measured: it goes to ``failed`` (a list to append to)
    with the error, as the peer's own limit on this model; any other candidate's error propagates.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    say = progress or (lambda name, i, n: None)
    from ..adapters import find_denoiser

    denoiser = find_denoiser(pipe)
    judge = Judge(work.model, len(work.seeds))

    work.generate(pipe)  # process warm-up: first-call allocations stay out of every number
    reference = work.generate(pipe)
    full_flops = _flops(lambda: work.generate(pipe))
    rows, samples = [], {}
    for i, cand in enumerate(candidates):
        say(cand.name, i, len(candidates))
        handle = cand.attach(pipe)
        try:
            try:
                with StepProbe(denoiser) as probe, cand.generation(pipe):
                    images = work.generate(pipe)  # warm-up of this candidate, also its images
            except Exception as e:
                if cand.kind != "peer" or failed is None:
                    raise
                reason = (str(e).splitlines() or [""])[0][:300]
                failed.append(
                    {
                        "name": cand.name,
                        "kind": "peer",
                        "peer": cand.peer or "",
                        "reason": f"failed: {type(e).__name__}: {reason}",
                    }
                )
                continue
            stats = handle.stats() if handle is not None else None
            with cand.generation(pipe):
                flops = _flops(lambda: work.generate(pipe))
            ideal = full_flops / flops if flops > 0 else math.inf
            ref_times, times, deterministic = [], [], True
            status = "ok"
            for attempt in range(2):  # a second, longer attempt when the first beats the ideal
                for _ in range(repeats * (1 + attempt)):
                    cand.detach(pipe)
                    ref_times.append(_timed(lambda: work.generate(pipe))[1])
                    cand.attach(pipe)
                    with cand.generation(pipe):
                        again, seconds = _timed(lambda: work.generate(pipe))
                    times.append(seconds)
                    deterministic &= bool(np.array_equal(again, images))
                above = beyond_ideal(ref_times, times, ideal)
                if not above:
                    break
                status = "remeasured"
            if above:
                status = "above_flop_ideal"
        finally:
            cand.detach(pipe)
        actions = list(stats["actions"]) if stats is not None else probe.actions()
        row_actions = stats["row_actions"] if stats is not None else None
        psnr = psnr_per_image(images, reference)
        ssim = ssim_per_image(images, reference)
        speedup = statistics.median(ref_times) / statistics.median(times)
        flop_fraction = flops / full_flops
        rows.append(
            {
                "name": cand.name,
                "kind": cand.kind,
                "peer": cand.peer,
                "params": cand.params,
                "speedup": speedup,
                "speedup_ci": speedup_interval(ref_times, times),
                "speedup_status": status,
                "flop_ideal": ideal,
                "nfe_fraction": _row_fraction(row_actions) if row_actions else _row_fraction(actions),
                "flop_fraction": flop_fraction,
                "efficiency": speedup * flop_fraction,
                "psnr": _mean_or_inf(psnr),
                "psnr_ci": _interval(psnr),
                "psnr_identical": int((~np.isfinite(psnr)).sum()),
                "ssim": float(ssim.mean()),
                "ssim_ci": _interval(ssim),
                "fd_domain": judge.fd_domain(images),
                "class_acc": judge.class_acc(images, work.labels),
                "adherence": judge.adherence(images, work.captions),
                "latency_s": {
                    "median": statistics.median(times),
                    "min": min(times),
                    "max": max(times),
                    "all": times,
                    "reference_median": statistics.median(ref_times),
                    "reference_all": ref_times,
                },
                "actions": "".join(actions),
                "fallbacks": stats.get("fallbacks", 0) if stats is not None else None,
                "cache_bytes_per_sample": stats["cache_bytes"] / len(work.seeds) if stats else None,
                "deterministic": deterministic,
            }
        )
        samples[cand.name] = images[:GRID_SAMPLES]
    samples["__reference__"] = reference[:GRID_SAMPLES]
    return rows, samples


def resolve(
    model: Any,
    workload: Any,
    steps: int | None,
    guidance: float | None,
    seeds: int | None,
) -> Any:
    """Checks ``model`` and ``workload`` together (a workload, or the zoo's defaults tuned by
    ``steps``, ``guidance`` and ``seeds``, never both); returns the workload (None for zoo
    defaults). A model outside the zoo needs a workload: what it generates is the user's."""
    from ..pipelines import check_spec, is_zoo
    from ..workload import WorkloadError, as_workload

    if isinstance(model, str):
        check_spec(model)  # a spec that names nothing is the first thing to say
    if workload is None:
        if not is_zoo(model):
            shown = model if isinstance(model, str) else type(model).__name__
            raise WorkloadError(
                f"workload: {shown} is not a zoo model; give a workload (its prompts or other inputs, "
                "steps, guidance and seeds) with --workload FILE or workload="
            )
        return None
    given = [n for n, v in (("steps", steps), ("guidance", guidance), ("seeds", seeds)) if v is not None]
    if given:
        raise WorkloadError(f"{given[0]}: set it in the workload, not beside it")
    return as_workload(workload)


def batch_for(
    target: Any,
    workload: Any,
    which: str,
    count: int,
    steps: int | None = None,
    guidance: float | None = None,
) -> Batch:
    """The batch of ``which`` seeds ("calib" or "heldout"): the workload's own (checked against
    the pipeline), or on a zoo model without one ``count`` seeds, 0.. for calibration and
    10_000.. held out, at ``steps`` and ``guidance`` (the model's defaults where None)."""
    if workload is None:
        base = 0 if which == "calib" else EVAL_SEED_BASE
        return make_batch(target.pipe, target.name, steps, guidance, [base + i for i in range(count)])
    workload.check_pipeline(target.pipe)
    seeds = workload.calib_seeds if which == "calib" else workload.heldout_seeds
    return workload_batch(target.pipe, target.name, workload, seeds)


def bench(
    model: Any,
    candidates: list[Candidate],
    out_dir: str | os.PathLike | None,
    steps: int | None = None,
    seeds: int | None = None,
    repeats: int = 5,
    guidance: float | None = None,
    unavailable: list[dict[str, str]] | None = None,
    command: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    workload: Any = None,
) -> dict[str, Any]:
    """Measure ``candidates`` (the reference is added first) on ``model``: a zoo key, a pipeline
    spec (folder, ``module:function``) or a pipeline object, with ``workload`` for the latter two.

    Writes ``out_dir/result.json``, ``out_dir/samples.safetensors`` and ``out_dir/report.html``
    (nothing when ``out_dir`` is None); returns the result document. Arguments are checked
    before anything is loaded or written.
    """
    from ..pipelines import load_pipeline
    from .report import render
    from .result import SCHEMA, decode_samples, encode_samples, validate_result

    check_run_names(candidates)
    wl = resolve(model, workload, steps, guidance, seeds)
    n_seeds = len(wl.heldout_seeds) if wl is not None else (16 if seeds is None else seeds)
    out = check_args(model, out_dir, steps, n_seeds, repeats, guidance)
    if out is not None:
        check_out_dir(out, BENCH_FILES)

    target = load_pipeline(model)
    pipe = target.pipe
    work = batch_for(target, wl, "heldout", n_seeds, steps, guidance)
    for cand in candidates:  # a method the model cannot run fails here, before any generation
        reason = unsupported(pipe, cand) if cand.kind == "stepcache" else None
        if reason is not None:
            raise ValueError(f"{cand.name}: {reason}")
    runs = [c for c in candidates if c.kind != "reference"]
    failed: list[dict[str, str]] = []
    rows, samples = measure(pipe, work, [reference_candidate(), *runs], repeats, progress, failed)
    doc = {
        "schema": SCHEMA,
        "model": target.name,
        **environment(),
        "command": command or "python " + " ".join(sys.argv),
        "protocol": {
            "steps": work.steps,
            "guidance": work.guidance,
            "seeds": [work.seeds[0], work.seeds[-1]],
            "num_seeds": len(work.seeds),
            **({"workload": wl.to_dict()} if wl is not None else {}),
            "repeats": repeats,
            "timing": "CUDA events" if torch.cuda.is_available() else "time.perf_counter",
            "warmup_excluded": True,
            "ci": "95% percentile bootstrap of the per-image mean",
            "metrics_skipped": skipped_metrics(rows),
        },
        "runs": rows,
        "unavailable": [*(unavailable or []), *failed],
    }
    validate_result(doc)
    if out is None:  # measured for the caller only
        return doc
    # Everything is rendered in memory first; result.json, which marks the folder as a finished
    # run, is renamed into place last, so a failure leaves the previous run's files intact.
    samples_bytes = encode_samples(samples)
    page = render(doc, decode_samples(samples_bytes, out / "samples.safetensors")).encode("utf-8")
    _io.atomic_write_many(
        [
            (out / "samples.safetensors", samples_bytes),
            (out / "report.html", page),
            (out / "result.json", _io.json_bytes(doc)),
        ]
    )
    return doc


def policies_from(presets: list[str] | None, policy_files: list[str] | None) -> list[Candidate]:
    """Candidates for preset names and policy files, each resolved (and validated) up front."""
    cands = []
    for name in presets or []:
        from .. import presets as registry

        if name not in registry.names():
            raise ValueError(f"preset: unknown preset {name!r}; available: {', '.join(registry.names())}")
        cands.append(policy_candidate(name, name))
    for path in policy_files or []:
        pol = Policy.load(path)
        taken = pol.name is None or pol.name in {c.name for c in cands}
        cands.append(policy_candidate(pol, str(path) if taken else pol.name))
    # The file-name fallback must also be a usable run name; refuse a bad one before any work.
    check_run_names(cands)
    return cands
