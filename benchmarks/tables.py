"""Markdown tables for docs/results.md from the committed benchmark JSON (so the prose quotes the files).

Run: python benchmarks/tables.py benchmarks/results/methods-fmnist-dit.json [...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _fmt(v: float | None, digits: int = 1, suffix: str = "") -> str:
    return "identical" if v is None else f"{v:.{digits}f}{suffix}"


def methods_table(doc: dict) -> str:
    ref = doc["reference"]
    has_acc = ref.get("class_acc") is not None
    has_fd = "fd_domain" in ref
    head = ["preset", "setting", "FLOPs", "uncond rows skipped", "cache KiB/sample", "speedup"]
    head += ["PSNR dB (95% CI)", "SSIM"]
    head += ["class acc"] * has_acc + ["FD-domain"] * has_fd
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref_cells = ["full compute", "", "100%", "0", "0", "1.00×", "—", "1"]
    ref_cells += ([f"{ref['class_acc']:.1%}"] if has_acc else []) + (
        [f"{ref['fd_domain']:.2f}"] if has_fd else []
    )
    lines.append("| " + " | ".join(ref_cells) + " |")
    for r in doc["runs"]:
        lo, hi = r["psnr_ci"]
        psnr = "identical" if r["psnr"] is None else f"{r['psnr']:.1f} ({lo:.1f}–{hi:.1f})"
        cells = [
            f"`{r['preset']}`",
            r["setting"],
            f"{r['flop_fraction']:.0%}",
            str(r.get("cfg_skipped", 0)),
            f"{r['cache_bytes_per_sample'] / 1024:.1f}",
            f"{r['speedup']:.2f}×",
            psnr,
            f"{r['ssim']:.3f}",
        ]
        cells += [f"{r['class_acc']:.1%}"] if has_acc else []
        cells += [f"{r.get('fd_domain', float('nan')):.2f}"] if has_fd else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    for path in sys.argv[1:]:
        doc = json.loads(Path(path).read_text())
        print(f"<!-- {path}: {doc['command']} ({doc.get('device', '')}) -->")
        print(methods_table(doc))
        print()


if __name__ == "__main__":
    main()
