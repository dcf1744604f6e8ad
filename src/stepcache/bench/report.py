"""The bench report: one self-contained HTML page (images embedded) regenerated from result.json.

Sections: Pareto plots (speedup vs PSNR and vs FD-domain, front highlighted, peers in their own
markers), a per-step action heatmap of every run, reference-vs-run sample grids on the same seeds,
the table of every number, the peers that could not run and why, and the protocol.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_write_bytes, atomic_write_many, check_out_file, read_limited
from .result import MAX_RESULT_BYTES, ResultError, load_samples, validate_result

MARKERS = {"stepcache": "o", "diffusers": "s", "cache-dit": "^"}
ACTION_CODES = {"C": 0, "P": 1, "G": 2, "E": 3}
ACTION_LABELS = ["compute", "partial (some blocks)", "cond-only (no uncond pass)", "estimate / reuse"]


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of the points no other point beats on speed and on quality, sorted by speed."""
    front = []
    for i, (s, q) in enumerate(points):
        dominated = any(
            (s2 >= s and (q2 >= q if higher_is_better else q2 <= q)) and (s2, q2) != (s, q)
            for j, (s2, q2) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _family(run: dict[str, Any]) -> str:
    return run.get("peer") or "stepcache"


def _finite_interval(lo: float | None, hi: float | None) -> bool:
    return lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi)


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _scatter(
    runs: list[dict[str, Any]], metric: str, label: str, higher_is_better: bool, title: str
) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [
        r
        for r in runs
        if r["kind"] != "reference"
        and r.get(metric) is not None
        and math.isfinite(r[metric])
        and r.get("speedup_status") != "above_flop_ideal"  # a measurement error is not a point
    ]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for fam, marker in MARKERS.items():
        mine = [r for r in pts if _family(r) == fam]
        if not mine:
            continue
        ax.scatter(
            [r["speedup"] for r in mine],
            [r[metric] for r in mine],
            marker=marker,
            s=46,
            label=fam,
            zorder=3,
            edgecolor="black",
            linewidth=0.5,
        )
        if metric == "psnr":
            for r in mine:
                lo, hi = r["psnr_ci"]
                if _finite_interval(lo, hi):
                    ax.plot([r["speedup"]] * 2, [lo, hi], color="grey", lw=0.8, zorder=2)
    front = pareto_front([(r["speedup"], r[metric]) for r in pts], higher_is_better)
    ax.plot(
        [pts[i]["speedup"] for i in front],
        [pts[i][metric] for i in front],
        color="crimson",
        lw=1.5,
        label="Pareto front",
        zorder=1,
    )
    for i in front:
        ax.annotate(
            pts[i]["name"],
            (pts[i]["speedup"], pts[i][metric]),
            fontsize=7,
            xytext=(4, 3),
            textcoords="offset points",
            parse_math=False,  # a name with two $ would otherwise be parsed as TeX, and may not be
        )
    ref = next((r for r in runs if r["kind"] == "reference"), None)
    if metric in ("fd_domain", "adherence") and ref is not None and ref.get(metric) is not None:
        what = "FD" if metric == "fd_domain" else "adherence"
        ax.axhline(ref[metric], color="black", ls="--", lw=0.8, label=f"full-compute {what}")
    ax.axvline(1.0, color="black", lw=0.6, alpha=0.4)
    ax.set_xlabel("measured wall-clock speedup vs reference")
    ax.set_ylabel(label)
    ax.set_title(title, parse_math=False)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _heatmap(runs: list[dict[str, Any]]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    rows = [r for r in runs if r.get("actions")]
    if not rows:
        return None
    width = max(len(r["actions"]) for r in rows)
    grid = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        for j, a in enumerate(r["actions"]):
            grid[i, j] = ACTION_CODES.get(a, np.nan)
    colours = ["#1b5e20", "#81c784", "#ffb74d", "#e0e0e0"]
    fig, ax = plt.subplots(figsize=(min(14, 3 + 0.3 * width), 1 + 0.28 * len(rows)), dpi=100)
    ax.imshow(grid, cmap=ListedColormap(colours), vmin=-0.5, vmax=3.5, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(rows)), [r["name"] for r in rows], fontsize=7, parse_math=False)
    every = max(1, math.ceil(width / 50))  # a label per step stops being legible past ~50
    ax.set_xticks(range(0, width, every), [str(j) for j in range(0, width, every)], fontsize=6)
    ax.set_xlabel("denoising step")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours]
    ax.legend(
        handles,
        ACTION_LABELS,
        fontsize=7,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.12 - 0.6 / len(rows)),
        ncol=4,
    )
    return _png(fig)


def _grid(reference: np.ndarray, images: np.ndarray) -> str:
    from ..demo import grid_png

    diff = np.clip(np.abs(images - reference) * 4, 0, 1)
    return base64.b64encode(grid_png([reference, images, diff], scale=4)).decode("ascii")


def _band_section(runs: list[dict[str, Any]]) -> str:
    """The best stepcache run and the best peer run at each FLOP band, and the lead in dB."""
    from .bands import band_table, flop_speedup

    with_adherence = any(r.get("adherence") is not None for r in runs)

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return "–"
        text = f"{_esc(r['name'])}: {_fmt(r['psnr'], '.1f')} dB"
        if with_adherence:
            text += f", adherence {_fmt(r.get('adherence'), '.0%')}"
        speed = "noise" if r.get("speedup_status") == "above_flop_ideal" else _fmt(r["speedup"]) + "×"
        return text + f" ({_fmt(flop_speedup(r))}× FLOPs, {speed} wall)"

    rows = []
    for row in band_table(runs):
        lead = row["lead"]
        shown = "–" if lead is None else ("identical" if math.isinf(lead) else f"{lead:+.1f} dB")
        rows.append(
            f"<tr><td>≥ {row['band']:g}×</td><td>{cell(row['best'].get('stepcache'))}</td>"
            f"<td>{cell(row['top_peer'])}</td><td>{_esc(shown)}</td></tr>"
        )
    head = "<tr><th>FLOP band</th><th>best stepcache run</th><th>best peer run</th><th>lead</th></tr>"
    return (
        "<h2>At matched FLOPs</h2><p>Per band, the runs that need at most 1/X of full compute's "
        "FLOPs; the best by PSNR on each side. FLOPs are exact; wall-clock is shown beside.</p>"
        f"<table>{head}{''.join(rows)}</table>"
    )


def _speed_cells(r: dict[str, Any]) -> list[str]:
    """Speedup, its interval and its FLOP ideal; a speedup above the ideal beyond its noise is
    a measurement error and is not shown as a number."""
    ci = r.get("speedup_ci")
    interval = _esc(f"[{ci[0]:.2f}, {ci[1]:.2f}]") if ci else "–"
    ideal = _fmt(r.get("flop_ideal")) + "×" if r.get("flop_ideal") is not None else "–"
    if r.get("speedup_status") == "above_flop_ideal":
        return [f"not shown: {_fmt(r['speedup'])}× measured exceeds the ideal", interval, ideal]
    return [_fmt(r["speedup"]) + "×", interval, ideal]


def _fmt(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "identical"
    return html.escape(format(value, spec))


def _esc(value: Any) -> str:
    """Anything from the result document, as HTML text: the document may come from anyone."""
    return html.escape(str(value), quote=True)


def render(doc: dict[str, Any], samples: dict[str, np.ndarray]) -> str:
    """The report page for a validated result document and its samples."""
    runs = doc["runs"]
    title = f"stepcache bench: {doc['model']}"
    parts = [f"<h1>{_esc(title)}</h1>"]
    proto = doc["protocol"]
    parts.append(
        f"<p>{len(runs) - 1} runs vs full compute on <b>{_esc(doc['device'])}</b>; "
        f"{_esc(proto['steps'])} steps, guidance {_esc(proto['guidance'])}, "
        f"{_esc(proto['num_seeds'])} seeds, median of {_esc(proto['repeats'])} timed repeats.</p>"
    )
    figures = [
        (
            "Speed vs fidelity",
            _scatter(
                runs,
                "psnr",
                "PSNR vs reference (dB), 95% CI",
                True,
                "speedup vs PSNR (higher right is better)",
            ),
        ),
        (
            "Speed vs distribution",
            _scatter(runs, "fd_domain", "FD-domain (lower is better)", False, "speedup vs FD-domain"),
        ),
        (
            "Speed vs prompt adherence",
            _scatter(
                runs,
                "adherence",
                "share of samples the judge finds faithful to the caption",
                True,
                "speedup vs adherence (higher right is better)",
            ),
        ),
        ("What each run did per step", _heatmap(runs)),
    ]
    for caption, png in figures:
        if png is not None:
            parts.append(
                f'<h2>{_esc(caption)}</h2><img class="plot" alt="{_esc(caption)}" '
                f'src="data:image/png;base64,{png}">'
            )

    head = [
        "run",
        "kind",
        "speedup",
        "speedup 95% CI",
        "FLOP ideal",
        "latency (s)",
        "NFE frac",
        "FLOP frac",
        "efficiency",
        "PSNR (dB)",
        "PSNR 95% CI",
        "SSIM",
        "FD-domain",
        "class acc",
        "adherence",
    ]
    table = ["<table><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr>"]
    for r in runs:
        lo, hi = r["psnr_ci"]
        ci = _esc(f"[{lo:.1f}, {hi:.1f}]") if _finite_interval(lo, hi) else "–"
        cells = [
            _esc(r["name"]),
            _esc(_family(r) if r["kind"] != "reference" else "reference"),
            *_speed_cells(r),
            _fmt(r["latency_s"]["median"], ".3f"),
            _fmt(r["nfe_fraction"]),
            _fmt(r["flop_fraction"]),
            _fmt(r["efficiency"]),
            _fmt(r["psnr"], ".1f"),
            ci,
            _fmt(r["ssim"], ".3f"),
            _fmt(r["fd_domain"], ".1f"),
            _fmt(r["class_acc"], ".1%"),
            _fmt(r.get("adherence"), ".1%"),
        ]
        table.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    table.append("</table>")
    parts.append(_band_section(runs))
    parts.append("<h2>Every number</h2>" + "".join(table))
    parts.append(
        "<p>efficiency = measured speedup × FLOP fraction (1.0: the FLOPs saved all became time "
        "saved). PSNR averages the images that changed; a run that changed none reads identical.</p>"
    )

    if doc.get("unavailable"):
        items = "".join(f"<li><b>{_esc(u['name'])}</b>: {_esc(u['reason'])}</li>" for u in doc["unavailable"])
        parts.append(f"<h2>Could not run</h2><ul>{items}</ul>")

    reference = samples.get("__reference__")
    if reference is not None:
        parts.append("<h2>Samples on the same seeds</h2><p>Rows: reference, run, 4× absolute difference.</p>")
        for r in runs[1:]:
            if r["name"] in samples:
                png = _grid(reference, samples[r["name"]])
                parts.append(
                    f"<figure><figcaption>{_esc(r['name'])}</figcaption>"
                    f'<img class="grid" alt="samples {_esc(r["name"])}" '
                    f'src="data:image/png;base64,{png}"></figure>'
                )

    env = {k: doc.get(k) for k in ("device", "torch", "diffusers", "stepcache", "commit", "command")}
    parts.append(
        "<h2>Protocol and environment</h2><pre>"
        + _esc(json.dumps({"protocol": proto, **env}, indent=2))
        + "</pre>"
    )
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;"
        "text-align:right}td:first-child{text-align:left}img.plot{max-width:100%}"
        "figure{display:inline-block;margin:6px}figcaption{font-size:12px}"
    )
    # Records how many images decoded, so a headless browser test can read it from the DOM.
    script = (
        "window.addEventListener('load',function(){var n=0;document.querySelectorAll('img')"
        ".forEach(function(i){if(i.complete&&i.naturalWidth>0)n++});"
        "document.body.setAttribute('data-images-loaded',n);});"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(parts)}<script>{script}</script></body></html>\n"
    )


def _parse(path: Path, data: bytes) -> Any:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ResultError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise ResultError(f"{path}: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, or an integer too long to convert
        raise ResultError(f"{path}: not valid JSON ({e})") from None


def load_result(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The validated ``result.json`` of a bench or compare folder (ValueError naming the file and
    the field when it cannot be used)."""
    path = Path(out_dir) / "result.json"
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{path} not found; run `stepcache bench` or `stepcache compare` first")
    doc = _parse(path, read_limited(path, MAX_RESULT_BYTES, "result.json"))
    try:
        validate_result(doc)
    except ResultError as e:
        raise ResultError(f"{path}: {e}") from None
    return doc


def _samples(out: Path) -> dict[str, np.ndarray]:
    path = out / "samples.safetensors"
    return load_samples(path) if os.path.lexists(path) else {}


def figure_png(doc: dict[str, Any], where: str | os.PathLike) -> bytes:
    """The speed-vs-PSNR plot of a validated result document, as PNG bytes."""
    png = _scatter(
        doc["runs"],
        "psnr",
        "PSNR vs reference (dB), 95% CI",
        True,
        f"{doc['model']}: speedup vs PSNR ({doc['device']})",
    )
    if png is None:
        raise ValueError(f"{where}: no run with a finite PSNR to plot")
    return base64.b64decode(png)


def write_figure(out_dir: str | os.PathLike, path: str | os.PathLike) -> Path:
    """The speed-vs-PSNR plot of a bench or compare folder as a PNG file (for a README)."""
    check_out_file(path, "figure")
    return atomic_write_bytes(path, figure_png(load_result(out_dir), out_dir))


def write_report(out_dir: str | os.PathLike, figure: str | os.PathLike | None = None) -> Path:
    """(Re)write ``out_dir/report.html`` from ``out_dir/result.json`` and its samples (and the
    plot to ``figure``). Everything is read, checked and rendered before anything is written."""
    out = Path(out_dir)
    doc = load_result(out)
    page = out / "report.html"
    check_out_file(page, "report")
    if figure is not None:
        check_out_file(figure, "figure")
    files = [(page, render(doc, _samples(out)).encode("utf-8"))]
    if figure is not None:
        files.insert(0, (Path(figure), figure_png(doc, out)))
    atomic_write_many(files)
    return page
