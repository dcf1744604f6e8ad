"""Which diffusers denoiser classes take which stepcache rules, tried at tiny size.

Every class diffusers exports from ``diffusers.models.transformers`` and ``diffusers.models.unets``
gets a row. Classes with a tiny random-weight config in ``tests/tiny.py`` are run in a bare
10-step loop with a step rule (``static-interval``), a block rule (``dbcache`` with its middle
always skipped; ``deepcache`` on U-Nets) and nothing (must equal the untouched model bit for
bit); the others are listed with the adapter stepcache would use, "not tried". Writes
docs/coverage.md and benchmarks/results/coverage.json.

Run: python benchmarks/coverage.py  (--only A,B: try classes A and B, print, write nothing)
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import diffusers  # noqa: E402
import tiny  # noqa: E402

import stepcache  # noqa: E402
from stepcache._env import environment  # noqa: E402
from stepcache._io import atomic_write_bytes, atomic_write_json  # noqa: E402
from stepcache.adapters import ADAPTERS, adapter_for  # noqa: E402

SKIP_MIDDLE = {"threshold": 10.0, "max_consecutive": 100, "warmup": 1}


def exported_denoisers() -> list[type]:
    found = []
    for name in dir(diffusers):
        try:
            cls = getattr(diffusers, name)
        except Exception:  # an optional dependency missing: not a class we can build here
            continue
        if inspect.isclass(cls) and issubclass(cls, diffusers.ModelMixin):
            if ".models.transformers." in cls.__module__ or ".models.unets." in cls.__module__:
                found.append(cls)
    return sorted(found, key=lambda c: c.__name__)


def family(cls: type) -> str:
    return next((a.family for a in ADAPTERS if cls.__name__ in a.class_names), "generic")


def outcome(fn) -> str:
    try:
        return fn()
    except Exception as e:  # the row says why, in the model's or stepcache's own words
        return f"no: {type(e).__name__}: {str(e).splitlines()[0][:240]}"


@torch.no_grad()
def try_tiny(name: str) -> dict[str, str]:
    model = tiny.make(name)
    reference = tiny.sample(name, model, batch=2, steps=10)

    given = tiny.ENABLE_ARGS.get(name, {})

    def run(policy) -> tuple[torch.Tensor, list[str]]:
        handle = stepcache.enable(model, policy, **given)
        try:
            with handle.generation(num_steps=10):
                out = tiny.sample(name, model, batch=2, steps=10)
            return out, handle.stats()["actions"]
        finally:
            stepcache.disable(model)

    def off() -> str:
        out, _ = run(None)
        return "yes" if torch.equal(out, reference) else "no: differs from the untouched model"

    def step() -> str:
        out, actions = run("static-interval")
        ok = torch.isfinite(out).all() and actions.count("E") == 4
        return f"yes ({actions.count('E')}/10 estimated)" if ok else f"no: actions {''.join(actions)}"

    def block() -> str:
        if adapter_for(model).family == "UNet":  # no linear stack: the U-Net's own block method
            out, actions = run("deepcache")
            ok = torch.isfinite(out).all() and "P" in actions
            return f"DeepCache: yes ({actions.count('P')}/10 shallow)" if ok else f"no: {''.join(actions)}"
        out, actions = run(stepcache.presets.get("dbcache", **SKIP_MIDDLE))
        ok = torch.isfinite(out).all() and actions.count("P") == 9
        return "yes (middle skipped 9/10)" if ok else f"no: actions {''.join(actions)}"

    row = {"off": outcome(off), "step": outcome(step), "block": outcome(block)}
    if given:
        row["off"] += " (enable(" + ", ".join(f"{k}={v!r}" for k, v in given.items()) + "))"
    return row


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated class names: try these, print, write nothing")
    args = parser.parse_args()
    tried = {type(tiny.make(n)).__name__: n for n in tiny.FACTORIES}
    if args.only:
        for name in args.only.split(","):
            print({"class": name, **(try_tiny(tried[name]) if name in tried else {"off": "not tried"})})
        return
    rows = []
    for cls in exported_denoisers():
        row = {"class": cls.__name__, "adapter": family(cls)}
        if cls.__name__ in tried:
            row["adapter"] = adapter_for(tiny.make(tried[cls.__name__])).family
            row.update(try_tiny(tried[cls.__name__]))
        elif cls.__name__ in tiny.UNSUPPORTED:
            why = f"not run: {tiny.UNSUPPORTED[cls.__name__]}"
            row.update({"off": why, "step": why, "block": why})
        else:
            row.update({"off": "not tried", "step": "not tried", "block": "not tried"})
        rows.append(row)
        print(row, flush=True)
    tested = [r for r in rows if not r["off"].startswith("not ")]
    lines = [
        "# Denoiser coverage",
        "",
        f"{len(rows)} denoiser classes exported by diffusers {diffusers.__version__}; {len(tested)} tried at "
        "tiny size (a 10-step bare loop, batch 2). `python benchmarks/coverage.py` writes this file.",
        "Step and guidance rules need nothing of a class; block rules need a block stack (a family",
        "adapter, or the longest same-class list, proven a chain on the first call).",
        "",
        "| class | adapter | off = untouched | step rule | block rule |",
        "|---|---|---|---|---|",
        *(f"| `{r['class']}` | {r['adapter']} | {r['off']} | {r['step']} | {r['block']} |" for r in rows),
        "",
    ]
    atomic_write_bytes(ROOT / "docs" / "coverage.md", "\n".join(lines).encode())
    atomic_write_json(
        ROOT / "benchmarks" / "results" / "coverage.json",
        {
            "benchmark": "coverage",
            **environment(ROOT),
            "command": "python " + " ".join(sys.argv),
            "rows": rows,
        },
    )
    print(f"{len(tested)} of {len(rows)} tried; docs/coverage.md")


if __name__ == "__main__":
    main()
