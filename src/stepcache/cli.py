"""The ``stepcache`` command line (typer + rich)."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from . import _limits as lim
from . import presets as preset_registry
from . import zoo as zoo_registry
from .errors import PolicyError, UnsupportedModelError

app = typer.Typer(help="stepcache: training-free acceleration of diffusion sampling.", no_args_is_help=True)
zoo_app = typer.Typer(help="The benchmark models we train and ship.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
console = Console()


def _command() -> str:
    line = "stepcache " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    # Undecodable argv bytes arrive as lone surrogates, which a policy's meta refuses: spell them out.
    return line.encode("utf-8", "backslashreplace").decode("utf-8")


def _unicode(value: str | None) -> str | None:
    """A callback for a text option that ends up in a policy's meta: no undecodable bytes."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise typer.BadParameter(f"not valid UTF-8: {value!r}") from None
    return value


def _zoo_key(key: str, need_weights: bool = True) -> str:
    """``key`` if the zoo has it (and, with ``need_weights``, ships its weights); else a usage error."""
    if key not in zoo_registry.names():
        raise typer.BadParameter(f"unknown model {key!r}; available: {', '.join(zoo_registry.names())}")
    if need_weights and (problem := zoo_registry.model_problem(key)) is not None:
        raise typer.BadParameter(problem)
    return key


def _model_spec(model: str) -> str:
    """A zoo key, a diffusers pipeline folder or a module:function factory; else a usage error."""
    from .pipelines import PipelineSpecError, check_spec

    try:
        return check_spec(model)
    except PipelineSpecError as e:
        raise typer.BadParameter(str(e), param_hint="MODEL") from None


def _workload(path: Path | None) -> Any:
    """The workload file read and checked before any model loads (a usage error naming it)."""
    if path is None:
        return None
    from .workload import Workload

    try:
        return Workload.load(path)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--workload") from None


def _writable(path: Path, hint: str, files: tuple[str, ...] | None = None) -> None:
    """Refuse an output file (or, with ``files``, a folder for those files) that could not be
    written, before any model loads: a usage error naming the option, and nothing written."""
    from ._io import check_out_dir, check_out_file

    try:
        if files is None:
            check_out_file(path, hint.lstrip("-"))
        else:
            check_out_dir(path, files, hint.lstrip("-"))
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint=hint) from None


def _finite(lo: float, hi: float, above: bool = False) -> Callable[[float | None], float | None]:
    """A callback for a float option: typer's min/max let nan through and inf is a float."""

    def check(value: float | None) -> float | None:
        problem = None if value is None else lim.float_problem(value, lo, hi, above)
        if problem is not None:
            raise typer.BadParameter(problem)
        return value

    return check


def _parse_params(items: list[str]) -> dict[str, object]:
    """KEY=VALUE pairs; VALUE is read as JSON (numbers, true/false, lists), else kept as a string."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--param")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
        except (ValueError, RecursionError):  # e.g. past Python's 4300-digit limit on integers
            raise typer.BadParameter(
                f"{key}: cannot read a value of {len(raw)} characters (too many digits or too deeply nested)",
                param_hint="--param",
            ) from None
    return out


# Options several commands share, declared once.
Guidance = Annotated[
    float | None,
    typer.Option(callback=_finite(0.0, lim.MAX_GUIDANCE), help="CFG scale (model default if unset)."),
]
Steps = Annotated[
    int | None, typer.Option(min=1, max=lim.MAX_STEPS, help="Sampling steps (model default if unset).")
]
BenchSeeds = Annotated[
    int | None,
    typer.Option(min=1, max=lim.MAX_EVAL_SEEDS, help="Evaluation seeds 10000.. (zoo; default 16)."),
]
Model = Annotated[
    str, typer.Argument(help="Zoo key, diffusers pipeline folder, or module:function returning a pipeline.")
]
WorkloadFile = Annotated[
    Path | None,
    typer.Option(
        help="Workload JSON/YAML: inputs, steps, guidance, seeds (needed outside the zoo; docs/workload.md)."
    ),
]
BenchRepeats = Annotated[
    int, typer.Option(min=1, max=lim.MAX_REPEATS, help="Timed repeats per run (median reported).")
]


@app.command()
def demo(
    preset: Annotated[str, typer.Option(help="Preset to compare with full compute.")] = "adams-bashforth",
    policy: Annotated[Path | None, typer.Option(help="A policy JSON file (instead of --preset).")] = None,
    param: Annotated[
        list[str] | None,
        typer.Option("--param", "-p", help="Preset parameter override KEY=VALUE (repeatable)."),
    ] = None,
    model: Annotated[str, typer.Option(help="Zoo model key.")] = "fmnist-dit",
    steps: Steps = None,
    guidance: Guidance = None,
    samples: Annotated[int, typer.Option(min=1, max=lim.MAX_DEMO_SAMPLES, help="Images per run.")] = 16,
    repeats: Annotated[
        int, typer.Option(min=1, max=lim.MAX_REPEATS, help="Timed repeats (median reported).")
    ] = 5,
    seed: Annotated[int, typer.Option(min=0, max=lim.MAX_SEED, help="Random seed.")] = 0,
    out: Annotated[Path, typer.Option(help="Output folder for grid.png and result.json.")] = Path(
        "stepcache-demo"
    ),
) -> None:
    """Full compute vs a preset on a shipped model: steps computed, measured speedup, PSNR."""
    from .api import resolve_policy
    from .demo import DEMO_FILES, run_demo

    _zoo_key(model)
    if policy is not None and param:
        raise typer.BadParameter(
            "--param overrides a preset; edit the policy file instead", param_hint="--param"
        )
    try:
        if policy is not None:
            pol = resolve_policy(policy)
        else:
            pol = preset_registry.get(preset, **_parse_params(param or []))
    except PolicyError as e:
        hint = "--policy" if policy is not None else ("--param" if param else "--preset")
        raise typer.BadParameter(str(e), param_hint=hint) from None
    _writable(out, "--out", DEMO_FILES)
    with console.status("generating") as status:
        result = run_demo(
            model=model,
            policy=pol,
            steps=steps,
            guidance=guidance,
            samples=samples,
            seed=seed,
            repeats=repeats,
            out_dir=out,
            command=_command(),
            progress=lambda m: status.update(m),
        )
    table = Table(title=f"{model}: full compute vs {pol.name or 'policy'}")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("denoiser calls", str(result["denoiser_calls"]))
    table.add_row("computed in full", str(result["computed"]))
    table.add_row("partial (some blocks or rows)", str(result["partial"]))
    table.add_row("estimated (no network)", str(result["estimated"]))
    table.add_row("unconditional rows skipped", str(result["cfg_skipped"]))
    table.add_row("reference latency (median)", f"{result['latency_s']['reference_median'] * 1000:.1f} ms")
    table.add_row(
        "accelerated latency (median)", f"{result['latency_s']['accelerated_median'] * 1000:.1f} ms"
    )
    table.add_row("measured speedup", f"{result['speedup']:.2f}x")
    psnr = result["psnr_db_mean"]
    table.add_row("PSNR vs full compute", "identical" if psnr is None else f"{psnr:.2f} dB")
    if (judged := result.get("adherence")) is not None:
        table.add_row(
            "prompt adherence (judged)",
            f"{judged['accelerated']:.0%} (full compute {judged['reference']:.0%})",
        )
    console.print(table)
    print(result["grid_png"])
    print(result["result_json"])


@app.command()
def calibrate(
    method: Annotated[
        str,
        typer.Argument(
            help="A method with coefficients (linear-ag, magcache, teacache, hyca) or a threshold to fit "
            "(fbcache, dbcache)."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Policy JSON file to write.")],
    model: Annotated[
        str, typer.Option(help="Zoo key, diffusers pipeline folder, or module:function.")
    ] = "fmnist-dit",
    workload: WorkloadFile = None,
    steps: Annotated[
        int | None, typer.Option(min=2, max=lim.MAX_STEPS, help="Sampling steps (model default if unset).")
    ] = None,
    guidance: Guidance = None,
    samples: Annotated[
        int | None,
        typer.Option(min=1, max=lim.MAX_CALIB_SAMPLES, help="Calibration images, seeds 0..N-1 (zoo; 32)."),
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option("--param", "-p", help="Other preset parameter KEY=VALUE (repeatable)."),
    ] = None,
) -> None:
    """Fit a method's coefficients (or its threshold) on full-compute runs of a model; write the policy."""
    from .calibration import calibrated
    from .tools import calibrate as fit

    if method not in calibrated():
        raise typer.BadParameter(
            f"{method!r} has no coefficients or threshold to fit; choose one of {', '.join(calibrated())}"
        )
    _model_spec(model)
    wl = _workload(workload)
    try:
        overrides = _parse_params(param or [])
        preset_registry.get(method, **overrides)  # check the overrides before the work
    except PolicyError as e:
        raise typer.BadParameter(str(e), param_hint="--param") from None
    _writable(out, "--out")
    try:
        with console.status(f"recording full-compute samples of {model}"):
            pol = fit(
                model,
                wl,
                method,
                samples=samples,
                steps=steps,
                guidance=guidance,
                command=_command(),
                **overrides,
            )
    except (UnsupportedModelError, ValueError) as e:  # e.g. teacache on a U-Net; nothing is written
        raise typer.BadParameter(str(e), param_hint="METHOD / --model / --workload") from None
    pol.save(out)
    meta = pol.meta
    console.print(
        f"fitted {method} on {meta['calibration']['samples']} samples of {meta['model']} "
        f"({meta['steps']} steps, guidance {meta['guidance_scale']})"
    )
    print(out)


def _bench_progress() -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def _print_bench(doc: dict[str, Any], out: Path) -> None:
    import math

    from rich.markup import escape  # names come from policy files: "[/x]" would be a markup error

    table = Table(title=escape(f"{doc['model']} on {doc['device']}: {doc['protocol']['num_seeds']} seeds"))
    table.add_column("run", min_width=30, overflow="fold")
    for col in ("speedup", "FLOP", "PSNR dB", "FD-dom", "acc", "adher."):
        table.add_column(col, justify="right", no_wrap=True)

    def fmt(v: Any, spec: str) -> str:
        if v is None:
            return "-"
        return "same" if isinstance(v, float) and math.isinf(v) else format(v, spec)

    flagged = [r for r in doc["runs"] if r.get("speedup_status") == "above_flop_ideal"]
    for r in doc["runs"]:
        table.add_row(
            escape(r["name"]),
            "noise" if r in flagged else fmt(r["speedup"], ".2f") + "x",
            fmt(r["flop_fraction"], ".2f"),
            fmt(r["psnr"], ".1f"),
            fmt(r["fd_domain"], ".1f"),
            fmt(r["class_acc"], ".0%"),
            fmt(r.get("adherence"), ".0%"),
        )
    console.print(table)
    if any(r["kind"] == "peer" for r in doc["runs"]):
        _print_bands(doc["runs"])
    for r in flagged:
        console.print(
            f"[yellow]speedup not shown[/yellow] {escape(r['name'])}: measured {r['speedup']:.2f}x, above "
            f"the {r['flop_ideal']:.2f}x its FLOPs allow even when re-measured (a busy machine, not a result)"
        )
    for u in doc.get("unavailable", []):
        console.print(f"[yellow]not run[/yellow] {escape(u['name'])}: {escape(str(u['reason']))}")
    for metric, why in doc["protocol"].get("metrics_skipped", {}).items():
        console.print(f"[dim]not measured: {metric} ({why})[/dim]")
    print(out / "result.json")
    print(out / "report.html")


def _print_bands(runs: list[dict[str, Any]]) -> None:
    """stepcache's best run against the best peer run at each FLOP band (see bench.bands)."""
    from rich.markup import escape

    from .bench.bands import band_table

    table = Table(title="at matched FLOPs (best PSNR per side)")
    for col in ("FLOPs", "stepcache", "peer", "lead dB"):
        table.add_column(col, justify="right" if col != "stepcache" and col != "peer" else "left")

    def cell(r: dict[str, Any] | None) -> str:
        return "-" if r is None else f"{escape(r['name'])} {r['psnr']:.1f}"

    for row in band_table(runs):
        lead = row["lead"]
        table.add_row(
            f">= {row['band']:g}x",
            cell(row["best"].get("stepcache")),
            cell(row["top_peer"]),
            "-" if lead is None else f"{lead:+.1f}",
        )
    console.print(table)


def _run_bench(fn: Any, **kwargs: Any) -> dict[str, Any]:
    with _bench_progress() as bar:
        task = bar.add_task("measuring", total=None)
        said: list[str] = []

        def progress(name: str, i: int, n: int) -> None:
            what = name if name.startswith("tuning ") else f"measuring {name}"
            bar.update(task, total=n, completed=i, description=what)
            # A log file gets no live bar: a line per new stage, so `tail` shows how far it is.
            if not console.is_terminal and (not said or said[-1] != what):
                said.append(what)
                console.print(f"[{i + 1}/{n}] {what}  {bar.tasks[0].elapsed or 0.0:.0f} s")

        try:
            doc = fn(progress=progress, command=_command(), **kwargs)
        except (ValueError, PolicyError) as e:
            raise typer.BadParameter(str(e)) from None
        bar.update(task, completed=len(doc["runs"]), description="done")
    return doc


@app.command()
def bench(
    model: Model,
    out: Annotated[Path, typer.Option(help="Folder for result.json, samples and report.html.")],
    preset: Annotated[
        list[str] | None, typer.Option("--preset", help="Preset to measure (repeatable).")
    ] = None,
    policy: Annotated[
        list[Path] | None, typer.Option("--policy", help="Policy JSON file (repeatable).")
    ] = None,
    steps: Steps = None,
    seeds: BenchSeeds = None,
    repeats: BenchRepeats = 5,
    guidance: Guidance = None,
    workload: WorkloadFile = None,
) -> None:
    """Measure policies against full compute: speedup, FLOPs, PSNR/SSIM with CIs, FD, accuracy."""
    from .bench import bench as run
    from .bench import policies_from
    from .bench.harness import BENCH_FILES

    if not preset and not policy:
        raise typer.BadParameter("give at least one --preset or --policy")
    _model_spec(model)
    wl = _workload(workload)
    _writable(out, "--out", BENCH_FILES)
    try:
        cands = policies_from(preset, [str(p) for p in policy or []])
    except (ValueError, PolicyError) as e:
        raise typer.BadParameter(str(e), param_hint="--preset / --policy") from None
    doc = _run_bench(
        run,
        model=model,
        candidates=cands,
        out_dir=out,
        steps=steps,
        seeds=seeds,
        repeats=repeats,
        guidance=guidance,
        workload=wl,
    )
    _print_bench(doc, out)


@app.command()
def compare(
    model: Model,
    out: Annotated[Path, typer.Option(help="Folder for result.json, samples and report.html.")],
    peers: Annotated[
        str,
        typer.Option(
            help="Comma-separated peers: cache-dit, diffusers, or one method of one, "
            "e.g. diffusers:FasterCache ('' for none)."
        ),
    ] = "cache-dit,diffusers",
    policy: Annotated[
        list[Path] | None,
        typer.Option("--policy", help="Extra policy JSON, e.g. a searched one (repeatable)."),
    ] = None,
    preset: Annotated[
        list[str] | None,
        typer.Option("--preset", help="Only these presets of the sweep (repeatable; default all)."),
    ] = None,
    steps: Steps = None,
    seeds: BenchSeeds = None,
    repeats: BenchRepeats = 5,
    guidance: Guidance = None,
    workload: WorkloadFile = None,
    tune_peers: Annotated[
        float | None,
        typer.Option(
            callback=_finite(0.0, lim.MAX_TUNE_BUDGET, above=True),
            help="Also tune each peer method for every FLOP band with this budget (full-generation "
            "equivalents of the calibration batch, as search --budget) and measure the winners.",
        ),
    ] = None,
) -> None:
    """stepcache's preset sweep vs cache-dit and diffusers' cache hooks, same model, seeds and steps."""
    from .bench.compare import compare as run
    from .bench.harness import BENCH_FILES
    from .policy import Policy

    _model_spec(model)
    wl = _workload(workload)
    _writable(out, "--out", BENCH_FILES)
    try:
        pols = [Policy.load(p) for p in policy or []]
    except PolicyError as e:
        raise typer.BadParameter(str(e), param_hint="--policy") from None
    names = [p.strip() for p in peers.split(",") if p.strip()]
    sweep = None
    if preset:
        from .bench.compare import default_sweep

        full = default_sweep()
        unknown = sorted(set(preset) - {p for p, _ in full})
        if unknown:
            swept = ", ".join(dict.fromkeys(p for p, _ in full))
            raise typer.BadParameter(f"{unknown[0]!r} is not in the sweep ({swept})", param_hint="--preset")
        sweep = [(p, o) for p, o in full if p in preset]
    doc = _run_bench(
        run,
        model=model,
        peers=names,
        policies=pols,
        sweep=sweep,
        out_dir=out,
        steps=steps,
        seeds=seeds,
        repeats=repeats,
        guidance=guidance,
        workload=wl,
        tune_peers=tune_peers,
    )
    _print_bench(doc, out)


@app.command()
def search(
    model: Model,
    out: Annotated[Path, typer.Option(help="Policy JSON file to write.")],
    speedup: Annotated[
        float | None,
        typer.Option(
            callback=_finite(0.0, lim.MAX_SPEEDUP, above=True),
            help="Target: this measured speedup, best PSNR.",
        ),
    ] = None,
    min_psnr: Annotated[
        float | None,
        typer.Option(callback=_finite(0.0, lim.MAX_PSNR), help="Target: PSNR >= this (dB), fastest."),
    ] = None,
    min_adherence: Annotated[
        float | None,
        typer.Option(
            callback=_finite(0.0, 1.0),
            help="Also require the prompt judge's share of faithful samples >= this (shapes models).",
        ),
    ] = None,
    budget: Annotated[
        float,
        typer.Option(
            callback=_finite(0.0, lim.MAX_BUDGET, above=True),
            help="Full-generation equivalents of the calibration batch.",
        ),
    ] = 10.0,
    searcher: Annotated[
        str,
        typer.Option(help="tpe, nsga2, cmaes, random, planner, or the baselines evolution, anneal and ecad."),
    ] = "tpe",
    storage: Annotated[
        str | None,
        typer.Option(help="Optuna storage URL (default: sqlite file beside --out; none for cmaes)."),
    ] = None,
    study: Annotated[
        str | None, typer.Option(callback=_unicode, help="Study name; the same name resumes it.")
    ] = None,
    workload: WorkloadFile = None,
    calib_seeds: Annotated[
        int | None, typer.Option(min=1, max=lim.MAX_CALIB_SEEDS, help="Calibration seeds 0..K-1 (zoo; 16).")
    ] = None,
    heldout_seeds: Annotated[
        int | None,
        typer.Option(min=1, max=lim.MAX_EVAL_SEEDS, help="Held-out seeds 10000..10000+M-1 (zoo; 16)."),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(min=2, max=lim.MAX_STEPS, help="Sampling steps (model default if unset).")
    ] = None,
    guidance: Guidance = None,
    seed: Annotated[int, typer.Option(min=0, max=lim.MAX_SEED, help="Sampler seed.")] = 0,
    engine: Annotated[str, typer.Option(help="local, or ray: evaluate candidates on Ray workers.")] = "local",
    workers: Annotated[
        int, typer.Option(min=1, max=lim.MAX_WORKERS, help="Ray workers (with --engine ray).")
    ] = 2,
    ray_address: Annotated[
        str | None, typer.Option(help="A Ray cluster to join (default: start a local one).")
    ] = None,
    report: Annotated[
        Path | None, typer.Option(help="Also bench the found policy on the held-out seeds into this folder.")
    ] = None,
    blocks: Annotated[
        bool, typer.Option("--blocks", help="Also search the block level (dbcache span and threshold).")
    ] = False,
) -> None:
    """Find the policy that meets a target (--speedup X or --min-psnr Q) without gradients."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .search import SearchError
    from .search import search as run
    from .search.study import BASELINES

    _model_spec(model)
    wl = _workload(workload)
    # Every output is checked before the search, not after an hour of it.
    _writable(out, "--out")
    if report is not None:
        from .bench.harness import BENCH_FILES

        _writable(report, "--report", BENCH_FILES)
    # cmaes keeps pickles in its storage: it runs in memory only (the search refuses a storage for it)
    if storage is None and searcher not in (*BASELINES, "cmaes"):
        _writable(out.with_suffix(".optuna.db"), "--out")  # the default storage beside it
        storage = "sqlite:///" + str(out.with_suffix(".optuna.db"))
    with Progress(
        TextColumn("budget"),
        BarColumn(),
        TextColumn("{task.completed:.2f}/{task.total:g} gen-equiv"),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("", total=budget)
        try:
            pol = run(
                model,
                wl,
                speedup=speedup,
                min_psnr=min_psnr,
                min_adherence=min_adherence,
                budget=budget,
                searcher=searcher,
                storage=storage,
                study=study,
                calib_seeds=calib_seeds,
                heldout_seeds=heldout_seeds,
                steps=steps,
                guidance=guidance,
                out=out,
                seed=seed,
                blocks=blocks,
                engine=engine,
                workers=workers,
                ray_address=ray_address,
                command=_command(),
                progress=lambda used, total, note: _search_progress(bar, task, used, total, note),
            )
        except (SearchError, PolicyError) as e:
            raise typer.BadParameter(str(e)) from None
    meta = pol.meta
    cal, held, oracle = meta["calibration"], meta["heldout"], meta["oracle"]
    table = Table(
        title=f"{pol.name}: {meta['search']['evaluated']} candidates, {meta['budget_used']:.2f} gen-equiv"
    )
    for col in ("", "PSNR dB", "speedup"):
        table.add_column(col, justify="left" if not col else "right")
    table.add_row(
        f"calibration seeds {cal['seeds']}",
        f"{cal['psnr']:.2f}",
        f"{cal['predicted_speedup']:.2f}x FLOPs",
    )
    table.add_row(
        f"held-out seeds {held['seeds']}",
        f"{held['psnr']:.2f}",
        f"{held['flop_speedup']:.2f}x FLOPs, {held['measured_speedup']:.2f}x measured",
    )
    if oracle.get("speedup"):
        table.add_row(
            "oracle (planner on held-out)", f"{oracle['psnr']:.2f}", f"{oracle['speedup']:.2f}x FLOPs"
        )
    console.print(table)
    if held.get("adherence") is not None:
        full_cal, full_held = cal["reference_adherence"], held["reference_adherence"]
        console.print(
            f"prompt adherence: calibration {cal['adherence']:.0%} (full compute {full_cal:.0%}), "
            f"held-out {held['adherence']:.0%} (full compute {full_held:.0%})"
        )
    if not meta["target"]["met_on_calibration"]:
        console.print(
            "[yellow]target not met on the calibration seeds: this is the closest policy found[/yellow]"
        )
    if held["flop_speedup"] < cal["predicted_speedup"] - 1e-6:
        computed = sum(h == "C" != c for c, h in zip(cal["actions"], held["actions"], strict=False))
        console.print(
            f"[yellow]the held-out seeds skipped less work: {held['flop_speedup']:.2f}x FLOPs there, "
            f"not {cal['predicted_speedup']:.2f}x ({computed} step(s) computed that calibration skipped: "
            "an estimate was rejected)[/yellow]"
        )
    if report is not None:
        from .bench import bench as run_bench
        from .bench import policy_candidate

        doc = _run_bench(
            run_bench,
            model=model,
            candidates=[policy_candidate(pol, pol.name)],
            out_dir=report,
            steps=meta["steps"] if wl is None else None,
            seeds=(heldout_seeds or 16) if wl is None else None,
            repeats=5,
            guidance=meta["guidance_scale"] if wl is None else None,
            workload=wl,
        )
        _print_bench(doc, report)
    print(out)


@app.command()
def report(
    out: Annotated[Path, typer.Argument(help="A folder written by bench or compare.")],
    figure: Annotated[
        Path | None, typer.Option(help="Also write the speed-vs-PSNR plot to this PNG.")
    ] = None,
) -> None:
    """Regenerate DIR/report.html from DIR/result.json."""
    from .bench import write_report

    if figure is not None:
        _writable(figure, "--figure")
    try:
        path = write_report(out, figure)  # writes the page and the figure, or neither
    except (FileNotFoundError, ValueError) as e:
        raise typer.BadParameter(str(e), param_hint="DIR") from None
    if figure is not None:
        print(figure)
    print(path)


@app.command("presets")
def presets_cmd() -> None:
    """List the presets with a one-line description each."""
    table = Table(title="stepcache presets")
    table.add_column("name")
    table.add_column("description")
    for name in preset_registry.names():
        table.add_row(name, preset_registry.describe(name))
    console.print(table)


@zoo_app.command("list")
def zoo_list() -> None:
    """List the zoo's models and whether their weights are shipped."""
    table = Table(title="stepcache zoo")
    table.add_column("key")
    table.add_column("model")
    table.add_column("weights")
    for key in zoo_registry.names():
        info = zoo_registry.info(key)
        table.add_row(key, info["summary"], "shipped" if info["shipped"] else "not trained yet")
    console.print(table)


@zoo_app.command("info")
def zoo_info(key: Annotated[str, typer.Argument(help="Zoo model key.")]) -> None:
    """Show a model's card."""
    info = zoo_registry.info(_zoo_key(key, need_weights=False))
    console.print(info["card"] or info["summary"])


@zoo_app.command("train")
def zoo_train(
    key: Annotated[str, typer.Argument(help="Zoo model key.")],
    out: Annotated[Path, typer.Option(help="Folder for model.safetensors, config.json, train.json.")],
    steps: Annotated[
        int | None,
        typer.Option(min=1, max=lim.MAX_TRAIN_STEPS, help="Optimizer steps (recipe default if unset)."),
    ] = None,
    limit_images: Annotated[
        int | None, typer.Option(min=1, max=lim.MAX_TRAIN_IMAGES, help="Train on the first N images only.")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Resume from OUT/checkpoint.safetensors if present.")] = True,
    init_from: Annotated[
        str | None,
        typer.Option(help="Continue from these weights: a model folder, or 'shipped' for the packaged ones."),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            callback=_finite(0.0, lim.MAX_LR),  # 0 is allowed: training then leaves the weights as they were
            help="Peak learning rate (recipe default if unset).",
        ),
    ] = None,
) -> None:
    """Train a zoo model from its offline data; resumable from its checkpoint."""
    import copy

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .zoo.train import TRAIN_FILES, check_checkpoint, check_init, train

    spec = zoo_registry.spec(_zoo_key(key, need_weights=False))
    cfg = copy.deepcopy(spec.train)
    if steps is not None:
        cfg.steps = steps
    cfg.limit_images = limit_images
    if lr is not None:
        cfg.lr = lr
    init_dir = None
    if init_from is not None:
        init_dir = zoo_registry.model_dir(_zoo_key(key)) if init_from == "shipped" else Path(init_from)
        try:
            check_init(spec, init_dir)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--init-from") from None
    _writable(out, "--out", TRAIN_FILES)
    if resume:
        try:
            check_checkpoint(out / "checkpoint.safetensors")  # before the data loads, not after
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--resume") from None
    columns = (
        TextColumn("[bold]train"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    try:
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("train", total=cfg.steps, loss=float("nan"))
            info = train(
                key,
                out,
                cfg,
                resume=resume,
                progress=lambda s, n, loss: _train_progress(bar, task, s, n, loss),
                init_from=init_dir,
            )
    except zoo_registry.DataMissingError as e:
        console.print(f"[red]{e}")
        raise typer.Exit(1) from None
    except ValueError as e:  # a checkpoint written with other settings, or unusable --init-from
        hint = "--init-from" if str(e).startswith("--init-from") else "--resume"
        raise typer.BadParameter(str(e), param_hint=hint) from None
    console.print(f"trained {key} in {info['train_seconds']:.1f} s, final loss {info['final_loss']:.4f}")
    print(out / "model.safetensors")


def _search_progress(bar: Any, task: Any, used: float, total: float, note: str) -> None:
    before = bar.tasks[0].completed
    bar.update(task, completed=used, description=note)
    # A log file gets no live bar: a line each tenth of the budget, so `tail` shows progress.
    if not console.is_terminal and total > 0 and int(10 * used / total) > int(10 * before / total):
        console.print(f"spent {used:.2f}/{total:g} gen-equiv  {note}  {bar.tasks[0].elapsed or 0.0:.0f} s")


def _train_progress(bar: Any, task: Any, step: int, total: int, loss: float) -> None:
    bar.update(task, completed=step, loss=loss)
    # A log file gets no live bar: print a line every 5% instead, so `tail` shows progress.
    if not console.is_terminal and (step % max(1, total // 20) == 0 or step == total):
        elapsed = bar.tasks[0].elapsed or 0.0
        console.print(f"step {step}/{total}  loss {loss:.4f}  {elapsed:.0f} s")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
