"""The GPU benchmark script at tiny size on the CPU, the host-sync counter, and torch.compile."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import stepcache
from stepcache.bench.syncs import HostSyncCounter

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _perf():
    spec = importlib.util.spec_from_file_location("perf", ROOT / "benchmarks" / "gpu" / "perf.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["perf"] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch", ["flux", "dit", "sd3", "pixart", "unet", "wan"])
def test_perf_script_runs_end_to_end_at_tiny_size(arch: str, tmp_path: Path) -> None:
    out = tmp_path / "perf.json"
    _perf().main(["--arch", arch, "--size", "tiny", "--steps", "4", "--repeats", "1", "--out", str(out)])
    doc = json.loads(out.read_text())
    rows = {r["policy"]: r for r in doc["rows"]}
    unavailable = {u["policy"]: u["reason"] for u in doc["unavailable"]}
    assert {"no stepcache", "always compute", "static interval 2"} <= set(rows)
    assert rows["always compute"]["ideal_speedup"] == pytest.approx(1.0)
    # static interval 2 over 4 steps computes steps 0, 1 and 3: the FLOP ideal is 4/3 exactly
    assert rows["static interval 2"]["ideal_speedup"] == pytest.approx(4 / 3, rel=1e-3)
    assert rows["static interval 2"]["host_syncs_per_step"] < rows["static interval 3"]["host_syncs_per_step"]
    assert all(r["step_ms"] > 0 for r in doc["rows"]) and doc["device"] and doc["commit"] is not None
    assert set(rows).isdisjoint(unavailable) and all(unavailable.values())
    if arch == "unet":  # no linear block stack: the block caches say so instead of running
        assert "fbcache never skips" in unavailable and "cache-dit DBCache F1B0 never skips" in unavailable
        assert rows["deepcache interval 3"]["ideal_speedup"] > 1.2  # its partial computation
        return
    assert "not a U-Net" in unavailable["deepcache interval 3"]
    ours = rows["fbcache skips all it can"]
    assert ours["ideal_speedup"] > 1.3 and rows["fbcache never skips"]["ideal_speedup"] == pytest.approx(1.0)
    assert ours["host_syncs_per_step"] > rows["static interval 2"]["host_syncs_per_step"]
    # diffusers' FirstBlockCache needs CacheMixin (FLUX and Wan here); cache-dit an adapter
    assert ("diffusers FirstBlockCache never skips" in rows) == (arch in {"flux", "wan"})
    assert ("cache-dit DBCache F1B0 never skips" in rows) == (arch != "sd3")
    for peer in ("diffusers FirstBlockCache", "cache-dit DBCache F1B0"):
        if f"{peer} skips all it can" in rows:  # reset per generation: it skips what ours skips
            assert rows[f"{peer} skips all it can"]["ideal_speedup"] == pytest.approx(
                ours["ideal_speedup"], rel=0.02
            )


def test_host_sync_counter_catches_a_deliberate_item() -> None:
    x = torch.randn(4, device="meta")
    host = torch.ones(4, dtype=torch.bool)  # a host-side mask is not a sync
    with HostSyncCounter() as counter:
        value = (x * 2).sum().item()
        flag = bool(host.all())
        if (x > 0).any():
            pass
    assert counter.calls == {"item": 1, "__bool__": 1} and value == 0 and flag


def _meta_syncs(policy) -> int:
    model = tiny.make("dit").to("meta")
    handle = stepcache.enable(model, policy)
    hidden_arg, x, kw = tiny.inputs("dit", 2)
    kw = {k: v.to("meta") for k, v in kw.items()}
    with HostSyncCounter() as counter, handle.generation(num_steps=6):
        for i in range(6):
            model(
                **{hidden_arg: x.to("meta")},
                timestep=torch.full((2,), 1000.0 * (1 - i / 6), device="meta"),
                **kw,
            )
    stepcache.disable(model)
    return counter.count


def test_fixed_schedules_read_the_device_once_per_generation_when_they_compute_everything() -> None:
    # The one read: the guard's "was the model's own output finite" flags, at the end.
    assert _meta_syncs(stepcache.presets.get("static-interval", interval=1)) == 1
    without_guard = stepcache.Policy.from_dict(
        {**stepcache.presets.get("static-interval", interval=1).to_dict(), "guard": False}
    )
    assert _meta_syncs(without_guard) == 0
    # A per-sample block rule reads its decision once per call after the warm-up step, with the
    # guard's check of the estimate folded into that read: 5 calls + the end-of-generation read.
    assert _meta_syncs(stepcache.presets.get("fbcache")) == 6
    assert _meta_syncs(stepcache.presets.get("dbcache")) == 6


def test_compiled_model_keeps_working_with_a_policy() -> None:
    model = tiny.make("dit")
    hidden_arg, x, kw = tiny.inputs("dit", 2)

    def run(m: torch.nn.Module, compile_it: bool = False) -> torch.Tensor:
        handle = stepcache.enable(m, stepcache.presets.get("static-interval"))  # before compiling
        m = torch.compile(m) if compile_it else m
        with torch.no_grad(), handle.generation(num_steps=4):
            out = x
            for i in range(4):
                out = (
                    out
                    - m(**{hidden_arg: out}, timestep=torch.full((2,), 1000.0 * (1 - i / 4)), **kw)[0][
                        :, : out.shape[1]
                    ]
                    / 4
                )
        stats = handle.stats()
        stepcache.disable(model)
        return out, stats

    eager, eager_stats = run(model)
    compiled, compiled_stats = run(model, compile_it=True)
    assert compiled_stats["actions"] == eager_stats["actions"] == ["C", "C", "E", "C"]
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    with pytest.raises(stepcache.UnsupportedModelError, match="enable stepcache on the module first"):
        stepcache.enable(torch.compile(model), "fbcache")


@pytest.mark.parametrize(
    "preset, overrides", [("static-interval", {}), ("fbcache", {"threshold": 10.0, "max_consecutive": 2})]
)
def test_handle_compile_compiles_the_network_once_and_keeps_the_decisions(preset: str, overrides) -> None:
    model = tiny.make("dit")
    hidden_arg, x, kw = tiny.inputs("dit", 2)
    original_forward = model.forward

    def generate(handle) -> torch.Tensor:
        with torch.no_grad(), handle.generation(num_steps=6):
            out = x
            for i in range(6):
                t = torch.full((2,), 1000.0 * (1 - i / 6))
                out = out - model(**{hidden_arg: out}, timestep=t, **kw)[0][:, : out.shape[1]] / 6
        return out

    handle = stepcache.enable(model, stepcache.presets.get(preset, **overrides))
    eager = generate(handle)
    eager_actions = handle.stats()["actions"]
    assert "C" in eager_actions and set(eager_actions) != {"C"}  # the policy really saves work here
    torch._dynamo.reset()
    handle.compile()
    first = generate(handle)
    assert handle.stats()["actions"] == eager_actions
    torch.testing.assert_close(first, eager, atol=1e-4, rtol=1e-4)
    # The runtime's per-generation state is not traced: a second generation compiles nothing.
    with torch.compiler.set_stance("fail_on_recompile"):
        second = generate(handle)
    torch.testing.assert_close(second, first)
    with pytest.raises(RuntimeError, match="already compiled"):
        handle.compile()
    stepcache.disable(model)
    assert model.forward == original_forward and "forward" not in model.__dict__
    assert all("forward" not in blk.__dict__ for blk in model.transformer_blocks)
    with pytest.raises(RuntimeError, match="disabled"):  # it would patch a model it no longer holds
        handle.compile()
    assert "forward" not in model.__dict__


def test_sync_script_counts_every_architecture_on_meta(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("syncs", ROOT / "benchmarks" / "gpu" / "syncs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    doc = module.main(["--size", "tiny", "--out", str(tmp_path / "syncs.json"), "--steps", "6"])
    got = {(r["arch"], r["policy"]): r["host_syncs_per_step"] for r in doc["rows"]}
    assert {arch for arch, _ in got} == {"flux", "dit", "sd3", "pixart", "unet", "wan"}
    for arch in ("flux", "wan"):  # two streams on FLUX, one on Wan: still one read per call
        assert got[arch, "no stepcache"] == 0
        assert got[arch, "always compute"] == pytest.approx(1 / 6)  # the one read at the end
        assert got[arch, "static interval 2"] == pytest.approx(0.5)  # + the guard per estimate
        assert got[arch, "fbcache skips all it can"] == pytest.approx(1.0)  # 5 decisions + the end
    assert ("unet", "fbcache never skips") not in got and got["unet", "deepcache interval 3"] < 0.5
    # token steps choose their tokens on the device: only the read at the end (rotary FLUX refuses)
    assert got["dit", "toca preset"] == got["sd3", "toca 25% of tokens"] == pytest.approx(1 / 6)
    assert ("flux", "toca preset") not in got


def test_perf_table_never_prints_a_speedup_above_the_flop_ideal() -> None:
    spec = importlib.util.spec_from_file_location("perf_table", ROOT / "benchmarks" / "perf_table.py")
    perf_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(perf_table)
    row = {"policy": "static interval 2", "step_ms": 14.8, "ideal_speedup": 5 / 3, "host_syncs_per_step": 0.5}
    doc = {
        "rows": [
            {**row, "speedup": 1.82, "speedup_interval": [1.64, 1.83], "efficiency": 1.09},
            {**row, "policy": "static interval 3", "speedup": 1.60, "speedup_interval": [1.55, 1.62]},
        ]
    }
    lines = perf_table.table(doc).splitlines()
    assert "≤ 1.67× ‡ (read 1.82× [1.64, 1.83])" in lines[2] and "| 1.000 ‡ |" in lines[2]
    assert "| 1.60× [1.55, 1.62] |" in lines[3] and lines[-1].startswith("‡ read above the FLOP ideal")
