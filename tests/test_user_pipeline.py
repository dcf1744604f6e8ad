"""search, bench, compare and calibrate on a user's own pipeline (issue 18): a tiny random-weight
Stable Diffusion pipeline with a real CLIP text encoder, built here, as an object, saved to a
folder and loaded through the command line, and from a ``module:function`` factory; with
DPM-Solver++ and UniPC schedulers. Bad input exits 2, names the problem and writes nothing."""

import json

import numpy as np
import pytest
import tiny
import torch
from typer.testing import CliRunner

import stepcache
from stepcache.bench.result import validate_result
from stepcache.cli import app
from stepcache.policy import Policy
from stepcache.search.planner import SegmentErrors
from stepcache.search.trajectory import NotFirstOrderError, record
from stepcache.workload import Workload, WorkloadError

pytest.importorskip("transformers")

runner = CliRunner()
WORKLOAD = {
    "inputs": {"prompt": ["a red cat", "a blue square", "green"], "negative_prompt": ["blurry"]},
    "steps": 8,
    "guidance": 4.0,
    "height": 8,
    "width": 8,
    "calib_seeds": 3,
    "heldout_seeds": [500, 501, 502],
}


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe") / "tiny-sd"
    tiny.sd_pipeline("dpm").save_pretrained(folder)
    return folder


def _files(path):
    return sorted(p.name for p in path.rglob("*")) if path.exists() else []


# ---------------------------------------------------------------------------------- the workload


def test_workload_round_trips_through_json_and_yaml(tmp_path):
    wl = Workload.from_dict(WORKLOAD)
    assert wl.calib_seeds == (0, 1, 2) and wl.heldout_seeds == (500, 501, 502)
    assert wl.cond(4)["prompt"] == ["a red cat", "a blue square", "green", "a red cat"]
    assert wl.cond(2)["negative_prompt"] == ["blurry", "blurry"]
    wl.save(tmp_path / "w.json")
    assert Workload.load(tmp_path / "w.json") == wl
    (tmp_path / "w.yaml").write_text("inputs:\n  prompt: [a cat]\nsteps: 6\ncalib_seeds: [4, 5]\n")
    y = Workload.load(tmp_path / "w.yaml")
    assert y.steps == 6 and y.calib_seeds == (4, 5) and y.heldout_seeds[0] == 10_000


@pytest.mark.parametrize(
    "change, field",
    [
        ({"calib_seeds": [1, 2], "heldout_seeds": [2, 3]}, "heldout_seeds"),
        ({"steps": 1}, "steps"),
        ({"guidance": float("nan")}, "guidance"),
        ({"inputs": {"prompt": []}}, "inputs.prompt"),
        ({"inputs": {"generator": [1]}}, "inputs.generator"),
        ({"inputs": {"prompt": [object()]}}, "inputs.prompt[0]"),
        ({"call": {"prompt": "x"}}, "call.prompt"),
        ({"heldout_seeds": [-1]}, "heldout_seeds"),
        ({"calib_seeds": 0}, "calib_seeds"),
        ({"sampels": 3}, "sampels"),
    ],
)
def test_a_bad_workload_names_its_field(change, field):
    with pytest.raises(WorkloadError, match=f"^{field.replace('[', '.').replace(']', '.')}"):
        Workload.from_dict({**WORKLOAD, **change})


def test_a_workload_whose_arguments_the_pipeline_does_not_take_is_refused():
    pipe = tiny.sd_pipeline("dpm")
    wl = Workload.from_dict({**WORKLOAD, "inputs": {"prompt": ["x"], "class_labels": [3]}})
    with pytest.raises(WorkloadError, match="inputs: StableDiffusionPipeline does not take 'class_labels'"):
        wl.check_pipeline(pipe)


# ------------------------------------------------------------------------ replay on any scheduler


@pytest.mark.parametrize("scheduler", ["dpm", "unipc", "ddim"])
def test_the_planner_replays_a_multistep_scheduler_exactly(scheduler):
    """Reusing step 0's output for every later step, replayed through the scheduler's own
    ``step``, lands where a real run of that schedule lands."""
    pipe = tiny.sd_pipeline(scheduler)
    kw = dict(prompt=["a cat", "a dog"], num_inference_steps=6, guidance_scale=4.0, height=8, width=8)

    def run(latent_out):
        gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
        return pipe(**kw, generator=gens, output_type="latent" if latent_out else "np").images

    traj = record(pipe, lambda: run(False))
    assert traj.schedulers is not None  # not Euler-type: replayed through the scheduler
    predicted = SegmentErrors(traj, order=0)(-1, 0, traj.num_steps)
    stepcache.enable(pipe, stepcache.presets.get("schedule", mask=[True] + [False] * 5, order=0))
    try:
        latents = run(True)
    finally:
        stepcache.disable(pipe)
    real = float(((latents.float() - traj.x[-1]) ** 2).mean())
    assert real > 0
    assert predicted == pytest.approx(real, rel=1e-4)


def test_a_stochastic_scheduler_is_refused_with_the_reason():
    pipe = tiny.sd_pipeline("ancestral")
    gens = [torch.Generator().manual_seed(0)]
    with pytest.raises(NotFirstOrderError, match="adds fresh noise"):
        record(pipe, lambda: pipe(prompt=["a"], num_inference_steps=4, height=8, width=8, generator=gens))


# ----------------------------------------------------------------------- the tools, from Python


@pytest.mark.parametrize("scheduler", ["dpm", "unipc"])
def test_search_bench_and_calibrate_on_a_pipeline_object(scheduler):
    pipe = tiny.sd_pipeline(scheduler)
    wl = Workload.from_dict(WORKLOAD)
    pol = stepcache.search(pipe, wl, speedup=2, budget=3, oracle=False)
    meta = pol.meta
    assert meta["model"] == "StableDiffusionPipeline" and meta["scheduler"].startswith(
        {"dpm": "DPMSolver", "unipc": "UniPC"}[scheduler]
    )
    assert meta["calibration"]["seeds"] == [0, 2] and meta["heldout"]["seeds"] == [500, 502]
    assert meta["workload"] == wl.to_dict()
    assert meta["calibration"]["predicted_speedup"] >= 2 - 1e-9
    assert meta["model_hash"].startswith("sha256:")
    assert Policy.from_dict(pol.to_dict()) == pol  # a valid policy

    doc = stepcache.bench(pipe, wl, ["static-interval", pol], repeats=1)
    validate_result(doc)
    names = [r["name"] for r in doc["runs"]]
    assert names == ["reference", "static-interval", pol.name]
    assert doc["protocol"]["seeds"] == [500, 502] and doc["protocol"]["workload"] == wl.to_dict()
    # no judge for a user's pipeline: the judged metrics are null and the protocol says why
    assert set(doc["protocol"]["metrics_skipped"]) == {"class_acc", "fd_domain", "adherence"}
    assert all(r["class_acc"] is None and r["adherence"] is None for r in doc["runs"])
    searched = doc["runs"][2]
    assert searched["flop_fraction"] < 0.55  # 2x fewer FLOPs, as the search predicted
    assert searched["psnr"] == pytest.approx(meta["heldout"]["psnr"], abs=1e-6)

    fitted = stepcache.calibrate(pipe, wl, "magcache")
    ratios = fitted.to_dict()["rules"]["step"]["ratios"]
    assert len(ratios) == WORKLOAD["steps"]
    assert fitted.meta["calibration"] == {"seeds": [0, 2], "samples": 3}


def test_compare_on_a_pipeline_object_reports_every_run_or_why_not(tmp_path):
    pipe = tiny.sd_pipeline("dpm")
    sweep = [("static-interval", {}), ("deepcache", {}), ("fora", {})]
    doc = stepcache.compare(pipe, WORKLOAD, peers=[], sweep=sweep, repeats=1, out_dir=tmp_path / "c")
    validate_result(json.loads((tmp_path / "c" / "result.json").read_text()))
    ran = {r["name"] for r in doc["runs"]}
    assert {"reference", "static-interval", "deepcache"} <= ran
    assert [u["name"] for u in doc["unavailable"]] == ["fora"]  # a U-Net has no transformer blocks
    assert (tmp_path / "c" / "report.html").stat().st_size > 1000


def test_search_and_bench_on_an_unconditional_pipeline():
    """No inputs, no guidance: a DDIM pipeline sized by ``batch_size``, searched and measured."""
    from diffusers import DDIMPipeline, DDIMScheduler

    pipe = DDIMPipeline(unet=tiny.make("unet").eval(), scheduler=DDIMScheduler(num_train_timesteps=50))
    pipe.set_progress_bar_config(disable=True)
    wl = Workload(steps=6, calib_seeds=2, heldout_seeds=3)
    pol = stepcache.search(pipe, wl, speedup=2, budget=3, oracle=False)
    assert pol.meta["guidance_scale"] is None and pol.meta["calibration"]["predicted_speedup"] >= 2
    assert "cfg" not in str(pol.to_dict()["rules"])  # no guidance: nothing to leave out
    doc = stepcache.bench(pipe, wl, [pol], repeats=1)
    assert doc["protocol"]["guidance"] is None and doc["protocol"]["num_seeds"] == 3
    assert doc["runs"][1]["psnr"] == pytest.approx(pol.meta["heldout"]["psnr"], abs=1e-6)


def test_a_pipeline_outside_the_zoo_needs_a_workload():
    with pytest.raises(stepcache.search.SearchError, match="workload: StableDiffusionPipeline is not a zoo"):
        stepcache.search(tiny.sd_pipeline("dpm"), speedup=2)


# --------------------------------------------------------------------- the tools, from the CLI


def test_cli_searches_benches_compares_and_calibrates_a_saved_pipeline_folder(sd_folder, tmp_path):
    wl = tmp_path / "workload.json"
    wl.write_text(json.dumps(WORKLOAD))
    policy = tmp_path / "p.json"
    res = runner.invoke(
        app,
        ["search", str(sd_folder), "--workload", str(wl), "--speedup", "2", "--budget", "3",
         "--out", str(policy)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    pol = Policy.load(policy)
    assert pol.meta["model"] == str(sd_folder) and pol.meta["workload"]["steps"] == 8
    assert pol.name == "searched tiny-sd speedup2"  # the folder's name, not its whole path

    cmp = tmp_path / "cmp"
    res = runner.invoke(
        app,
        ["compare", str(sd_folder), "--workload", str(wl), "--peers", "diffusers", "--policy", str(policy),
         "--preset", "static-interval", "--preset", "deepcache", "--repeats", "1", "--out", str(cmp)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads((cmp / "result.json").read_text())
    validate_result(doc)
    assert doc["model"] == str(sd_folder) and doc["protocol"]["seeds"] == [500, 502]
    assert {"reference", "stepcache"} <= {r["kind"] for r in doc["runs"]}
    swept = {r["name"] for r in doc["runs"] + doc["unavailable"] if r["kind"] == "stepcache"}
    assert swept == {
        "static-interval",
        "static-interval interval=3",
        "deepcache",
        "deepcache interval=5",
        pol.name,
    }
    assert pol.name in {r["name"] for r in doc["runs"]}
    peers = [r for r in doc["runs"] + doc["unavailable"] if r["kind"] == "peer"]
    assert peers and all(r["name"].startswith("diffusers ") for r in peers)
    assert all(u["reason"] for u in doc["unavailable"])  # every run left out says why

    fitted = tmp_path / "m.json"
    res = runner.invoke(
        app, ["calibrate", "magcache", "--model", str(sd_folder), "--workload", str(wl), "--out", str(fitted)]
    )
    assert res.exit_code == 0, res.output
    assert len(Policy.load(fitted).to_dict()["rules"]["step"]["ratios"]) == 8


def test_cli_loads_a_module_function_factory(tmp_path, monkeypatch):
    (tmp_path / "my_pipes.py").write_text(
        "import tiny\n\ndef build():\n    return tiny.sd_pipeline('unipc')\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "w.json").write_text(json.dumps(WORKLOAD))
    res = runner.invoke(
        app,
        ["bench", "my_pipes:build", "--workload", "w.json", "--preset", "static-interval",
         "--repeats", "1", "--out", "b"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "b" / "result.json").read_text())
    assert doc["model"] == "my_pipes:build" and [r["name"] for r in doc["runs"]][1] == "static-interval"


@pytest.mark.parametrize(
    "case, message",
    [
        ("overlap", "heldout_seeds: 1 seed(s) also in calib_seeds"),
        ("raises", "the factory broken_pipes:build raised RuntimeError: no weights here"),
        ("not-a-pipeline", "is a folder but not a diffusers pipeline"),
        ("foreign-args", "does not take 'class_labels'"),
        ("no-workload", "workload:"),
        ("both", "steps: set it in the workload"),
    ],
)
@pytest.mark.parametrize("command", ["search", "bench", "calibrate"])
def test_cli_bad_input_exits_2_names_it_and_writes_nothing(
    case, message, command, tmp_path, monkeypatch, sd_folder
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "broken_pipes.py").write_text("def build():\n    raise RuntimeError('no weights here')\n")
    (tmp_path / "not-a-pipe").mkdir()
    workload = dict(WORKLOAD)
    model = str(sd_folder)
    extra = []
    if case == "overlap":
        workload["heldout_seeds"] = [2, 9]
    elif case == "raises":
        model = "broken_pipes:build"
    elif case == "not-a-pipeline":
        model = "not-a-pipe"
    elif case == "foreign-args":
        workload["inputs"] = {"prompt": ["x"], "class_labels": [1]}
    elif case == "both":
        extra = ["--steps", "4"]
    (tmp_path / "w.json").write_text(json.dumps(workload))
    wl_args = [] if case == "no-workload" else ["--workload", "w.json"]
    out = tmp_path / "out"
    if command == "search":
        args = ["search", model, "--speedup", "2", "--budget", "3", "--out", str(out / "p.json")]
    elif command == "bench":
        args = ["bench", model, "--preset", "static-interval", "--out", str(out)]
    else:
        args = ["calibrate", "magcache", "--model", model, "--out", str(out / "m.json")]
    before = _files(tmp_path)
    res = runner.invoke(app, [*args, *wl_args, *extra])
    assert res.exit_code == 2, res.output
    flat = " ".join(res.output.replace("│", " ").split())
    assert message in flat
    assert _files(tmp_path) == before or _files(tmp_path) == sorted([*before, "out"])
    assert _files(out) == []


def test_images_of_reads_videos_as_tall_images():
    from stepcache.pipelines import images_of

    class Out:
        frames = np.zeros((2, 3, 4, 5, 3), dtype=np.float32)

    assert images_of(Out()).shape == (2, 12, 5, 3)
