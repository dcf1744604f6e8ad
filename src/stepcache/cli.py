"""The ``stepcache`` command line (typer + rich)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from . import presets as preset_registry
from . import zoo as zoo_registry
from .errors import PolicyError, UnsupportedModelError

app = typer.Typer(help="stepcache: training-free acceleration of diffusion sampling.", no_args_is_help=True)
zoo_app = typer.Typer(help="The benchmark models we train and ship.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
console = Console()


def _command() -> str:
    return "stepcache " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _zoo_key(key: str) -> str:
    if key not in zoo_registry.names():
        raise typer.BadParameter(f"unknown model {key!r}; available: {', '.join(zoo_registry.names())}")
    return key


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
    return out


@app.command()
def demo(
    preset: Annotated[str, typer.Option(help="Preset to compare with full compute.")] = "adams-bashforth",
    policy: Annotated[Path | None, typer.Option(help="A policy JSON file (instead of --preset).")] = None,
    param: Annotated[
        list[str] | None,
        typer.Option("--param", "-p", help="Preset parameter override KEY=VALUE (repeatable)."),
    ] = None,
    model: Annotated[str, typer.Option(help="Zoo model key.")] = "fmnist-dit",
    steps: Annotated[int | None, typer.Option(min=1, help="Sampling steps (model default if unset).")] = None,
    guidance: Annotated[
        float | None, typer.Option(min=0.0, help="CFG scale (model default if unset).")
    ] = None,
    samples: Annotated[int, typer.Option(min=1, max=256, help="Images per run.")] = 16,
    repeats: Annotated[int, typer.Option(min=1, max=50, help="Timed repeats (median reported).")] = 5,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    out: Annotated[Path, typer.Option(help="Output folder for grid.png and result.json.")] = Path(
        "stepcache-demo"
    ),
) -> None:
    """Full compute vs a preset on a shipped model: steps computed, measured speedup, PSNR."""
    from .api import resolve_policy
    from .demo import run_demo

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
    console.print(table)
    print(result["grid_png"])
    print(result["result_json"])


@app.command()
def calibrate(
    method: Annotated[str, typer.Argument(help="Method with fitted coefficients: linear-ag or magcache.")],
    out: Annotated[Path, typer.Option(help="Policy JSON file to write.")],
    model: Annotated[str, typer.Option(help="Zoo model key.")] = "fmnist-dit",
    steps: Annotated[int | None, typer.Option(min=2, help="Sampling steps (model default if unset).")] = None,
    guidance: Annotated[
        float | None, typer.Option(min=0.0, help="CFG scale (model default if unset).")
    ] = None,
    samples: Annotated[int, typer.Option(min=1, max=1024, help="Calibration images (seeds 0..N-1).")] = 32,
    param: Annotated[
        list[str] | None,
        typer.Option("--param", "-p", help="Other preset parameter KEY=VALUE (repeatable)."),
    ] = None,
) -> None:
    """Fit a method's coefficients on full-compute runs of a zoo model; write the policy."""
    import torch

    from .calibrate import CALIBRATED
    from .calibrate import calibrate as fit
    from .demo import conditions
    from .policy import Policy

    if method not in CALIBRATED:
        raise typer.BadParameter(
            f"{method!r} has no coefficients to fit; choose one of {', '.join(CALIBRATED)}"
        )
    _zoo_key(model)
    try:
        overrides = _parse_params(param or [])
        preset_registry.get(method, **overrides)  # check the overrides before the work
    except PolicyError as e:
        raise typer.BadParameter(str(e), param_hint="--param") from None
    pipe = zoo_registry.load(model)
    n_steps = steps or pipe.default_steps
    scale = pipe.default_guidance if guidance is None else guidance
    gens = [torch.Generator().manual_seed(s) for s in range(samples)]

    def run() -> None:
        pipe(**conditions(pipe, samples), num_inference_steps=n_steps, guidance_scale=scale, generator=gens)

    try:
        with console.status(f"recording {samples} full-compute samples of {model}"):
            pol = fit(method, pipe, run, **overrides)
    except (UnsupportedModelError, ValueError) as e:  # e.g. teacache on a U-Net; nothing is written
        raise typer.BadParameter(str(e), param_hint="METHOD / --model") from None
    meta = {
        "model": model,
        "steps": n_steps,
        "guidance_scale": scale,
        "found_by": _command(),
        "calibration": {"seeds": [0, samples - 1], "samples": samples},
    }
    pol = Policy.from_dict({**pol.to_dict(), "name": f"{method} ({model})", "meta": meta})
    pol.save(out)
    console.print(f"fitted {method} on {samples} samples of {model} ({n_steps} steps, guidance {scale})")
    print(out)


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
    info = zoo_registry.info(_zoo_key(key))
    console.print(info["card"] or info["summary"])


@zoo_app.command("train")
def zoo_train(
    key: Annotated[str, typer.Argument(help="Zoo model key.")],
    out: Annotated[Path, typer.Option(help="Folder for model.safetensors, config.json, train.json.")],
    steps: Annotated[
        int | None, typer.Option(min=1, help="Optimizer steps (recipe default if unset).")
    ] = None,
    limit_images: Annotated[int | None, typer.Option(min=1, help="Train on the first N images only.")] = None,
    resume: Annotated[bool, typer.Option(help="Resume from OUT/checkpoint.safetensors if present.")] = True,
) -> None:
    """Train a zoo model from its offline data; resumable from its checkpoint."""
    import copy

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .zoo.train import train

    cfg = copy.deepcopy(zoo_registry.spec(_zoo_key(key)).train)
    if steps is not None:
        cfg.steps = steps
    cfg.limit_images = limit_images
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
            )
    except zoo_registry.DataMissingError as e:
        console.print(f"[red]{e}")
        raise typer.Exit(1) from None
    except ValueError as e:  # a checkpoint written with other settings
        raise typer.BadParameter(str(e), param_hint="--resume") from None
    console.print(f"trained {key} in {info['train_seconds']:.1f} s, final loss {info['final_loss']:.4f}")
    print(out / "model.safetensors")


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
