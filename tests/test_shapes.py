"""The shapes world: generator, judge, caption models, and prompt adherence in the harness."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage

from stepcache import disable, enable, zoo
from stepcache.bench.harness import adherence
from stepcache.zoo import shapes
from stepcache.zoo.models import MODELS, build
from stepcache.zoo.pipeline import CaptionPipeline, unstrip

KINDS = ("single", "pair", "video")


@pytest.mark.parametrize("split", ["train", "held_out"])
@pytest.mark.parametrize("kind", KINDS)
def test_judge_reads_the_generators_own_drawings(kind, split):
    drawings, texts = shapes.dataset({kind: 1.0}, 120, seed=7, split=split)
    acc = shapes.accuracy(texts, drawings)
    assert acc["all"] >= 0.99, acc
    assert set(acc) >= {"count", "colour", "shape", "all"}


def test_drawings_keep_the_rules_of_the_world():
    palette = {tuple(c) for c in shapes.COLOURS.values()} | {(0, 0, 0)}
    drawings, texts = shapes.dataset({"single": 1, "pair": 1}, 200, seed=3)
    for img, text in zip(drawings, texts, strict=True):
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert {tuple(p) for p in img.reshape(-1, 3)} <= palette
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        assert not border.any(), f"{text}: touches the border"
        # 8-connected: objects that touched diagonally would merge into one component
        labels, n = ndimage.label(img.max(axis=-1) > 0, structure=np.ones((3, 3)))
        assert n == len(shapes.parse(text).objects), text
        for sl in ndimage.find_objects(labels):
            h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
            assert shapes.MIN_SIDE - 1 <= max(h, w) <= shapes.MAX_SIDE, (text, h, w)
    video = shapes.draw("a green square moving left", seed=5)
    assert video.shape == (8, 32, 32, 3)
    xs = [ndimage.center_of_mass(f.max(axis=-1) > 0)[1] for f in video]
    assert np.allclose(np.diff(xs), -2.0)


def test_drawing_is_deterministic_by_seed():
    a = shapes.draw("a red circle above a blue square", seed=11)
    assert np.array_equal(a, shapes.draw("a red circle above a blue square", seed=11))
    assert not np.array_equal(a, shapes.draw("a red circle above a blue square", seed=12))
    x1, t1 = shapes.dataset({"pair": 1}, 20, seed=1)
    x2, t2 = shapes.dataset({"pair": 1}, 20, seed=1)
    assert t1 == t2 and np.array_equal(x1, x2)


def test_held_out_combinations_never_reach_training():
    for kind in KINDS:
        train, held = set(shapes.captions(kind, "train")), set(shapes.captions(kind, "held_out"))
        assert train and held and not train & held
    seen = [shapes.parse(t) for k in KINDS for t in shapes.captions(k, "train")]
    pairs = {(o.colour, o.shape) for c in seen for o in c.objects}
    assert not pairs & set(shapes.HELD_OUT_OBJECTS)
    # every colour and every shape is still learnable on its own
    assert {c for c, _ in pairs} == set(shapes.COLOURS) and {s for _, s in pairs} == set(shapes.SHAPES)


@pytest.mark.parametrize(
    ("drawn", "asked", "fails"),
    [
        ("a red circle", "a blue circle", "colour"),
        ("a red circle", "a red square", "shape"),
        ("a red triangle", "a red circle", "shape"),
        (
            "a red circle on the left of a blue square",
            "a red circle on the right of a blue square",
            "relation",
        ),
        ("a red circle above a blue square", "a red circle below a blue square", "relation"),
        ("a red circle above a blue square", "a red circle", "count"),
        ("a yellow triangle moving right", "a yellow triangle moving left", "direction"),
        ("a yellow triangle moving up", "a yellow triangle moving right", "direction"),
        ("a yellow triangle moving up", "a white triangle moving up", "colour"),
    ],
)
def test_judge_names_the_criterion_a_wrong_caption_breaks(drawn, asked, fails):
    image = shapes.draw(drawn, seed=2)
    assert shapes.judge(drawn, image)["all"]
    verdict = shapes.judge(asked, image)
    assert not verdict[fails] and not verdict["all"]


def test_judge_finds_nothing_in_an_empty_or_noisy_image():
    assert not shapes.judge("a red circle", np.zeros((32, 32, 3)))["count"]
    rng = np.random.default_rng(0)
    speckle = (rng.random((32, 32, 3)) < 0.02).astype(np.float32)  # isolated pixels: noise, not shapes
    assert shapes.blobs(speckle) == []


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("a purple circle", "purple"),
        ("a red hexagon", "hexagon"),
        ("two red circles", "not of the shapes world"),
        ("a red circle near a blue square", "not of the shapes world"),
        ("a red circle above a red circle", "differ"),
    ],
)
def test_a_caption_outside_the_world_is_refused_by_name(text, named):
    with pytest.raises(ValueError, match=named):
        shapes.parse(text)


def test_benchmark_captions_depend_on_the_seed_not_the_batch():
    calib = shapes.eval_captions(list(range(16)), video=False)
    held = shapes.eval_captions(list(range(10_000, 10_016)), video=False)
    assert calib == shapes.eval_captions(list(range(16)), video=False)
    assert calib[3:5] == shapes.eval_captions([3, 4], video=False)
    assert calib != held
    assert [shapes.parse(t).kind for t in calib[:4]] == ["single", "pair", "single", "pair"]
    assert {shapes.parse(t).kind for t in shapes.eval_captions([1, 2], video=True)} == {"video"}


def _tiny_pipe(key: str) -> CaptionPipeline:
    """The model's architecture at random weights (its training is a background job)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    spec = MODELS[key]
    torch.manual_seed(0)
    pipe = CaptionPipeline(build(spec.family, spec.config).eval(), FlowMatchEulerDiscreteScheduler())
    pipe.sample_shape = tuple(spec.sample_shape)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("key", ["shapes-dit", "shapes-video"])
def test_caption_pipeline_batches_like_singles_and_takes_rules(key):
    pipe = _tiny_pipe(key)
    prompts = ["a red circle", "a blue square above a green triangle"]

    def run(p, seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return pipe(prompt=p, num_inference_steps=4, guidance_scale=3.0, generator=gens)

    both = run(prompts, [0, 1])
    single = run(prompts[1:], [1])
    assert np.allclose(both.images[1:], single.images, atol=1e-5)
    if key == "shapes-video":
        assert both.frames.shape == (2, 8, 32, 32, 3) and both.images.shape == (2, 32, 256, 3)
        assert np.array_equal(unstrip(both.images, 8), both.frames)
    else:
        assert both.images.shape == (2, 32, 32, 3)
    handle = enable(pipe, "fora")
    try:
        fast = run(prompts, [0, 1]).images
        assert handle.stats()["actions"].count("C") < 4
    finally:
        disable(pipe)
    assert np.isfinite(fast).all()
    assert np.array_equal(run(prompts, [0, 1]).images, both.images)  # off again: untouched


def test_caption_training_runs_and_resumes(tmp_path, monkeypatch):
    from stepcache.zoo.captions import load_shapes_images
    from stepcache.zoo.train import train

    spec = MODELS["shapes-dit"]
    small = dataclasses.replace(spec, load_data=lambda: load_shapes_images(48))
    monkeypatch.setitem(MODELS, "shapes-dit", small)
    cfg = dataclasses.replace(spec.train, steps=2, batch_size=4, checkpoint_every=1, warmup=1)
    info = train("shapes-dit", tmp_path / "a", cfg)
    assert np.isfinite(info["final_loss"])
    pipe = zoo.load("shapes-dit", tmp_path / "a")
    assert isinstance(pipe, CaptionPipeline) and pipe.sample_shape == (3, 32, 32)
    out = pipe(prompt=["a red circle"], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 32, 32, 3)


def test_adherence_scores_faithful_and_unfaithful_samples():
    texts = shapes.eval_captions(list(range(6)), video=False)
    truth = np.stack([shapes.draw(t, seed=i) for i, t in enumerate(texts)]).astype(np.float32) / 255
    assert adherence("shapes-dit", truth, texts) == 1.0
    assert adherence("shapes-dit", np.zeros_like(truth), texts) == 0.0
    assert adherence("fmnist-dit", truth, texts) is None  # no judge for that model
    vids = shapes.eval_captions([0, 1], video=True)
    frames = np.stack([shapes.draw(t, seed=i) for i, t in enumerate(vids)]).astype(np.float32) / 255
    strips = frames.transpose(0, 2, 1, 3, 4).reshape(2, 32, 256, 3)
    assert adherence("shapes-video", strips, vids) == 1.0


def test_result_documents_carry_adherence_within_bounds_and_the_report_plots_it():
    import json
    from pathlib import Path

    from stepcache.bench.report import render
    from stepcache.bench.result import ResultError, validate_result

    path = Path(__file__).parent.parent / "benchmarks" / "results" / "compare-fmnist-dit" / "result.json"
    doc = json.loads(path.read_text())
    validate_result(doc)  # documents written before adherence existed stay valid
    assert "prompt adherence" not in render(doc, {})
    assert "At matched FLOPs" in render(doc, {})
    for i, run in enumerate(doc["runs"]):
        run["adherence"] = 0.5 + 0.4 * (i % 2)
    validate_result(doc)
    assert "Speed vs prompt adherence" in render(doc, {})
    for bad in (1.5, -0.1, float("nan"), "high"):
        doc["runs"][0]["adherence"] = bad
        with pytest.raises(ResultError, match="adherence"):
            validate_result(doc)


def test_search_constraint_on_adherence():
    from stepcache.search import Point, SearchError, Target
    from stepcache.search.space import Candidate
    from stepcache.search.study import _Run

    with pytest.raises(SearchError, match="min_adherence"):
        Target(speedup=2.0, min_adherence=1.5).check()
    for bad in (True, float("nan"), -0.1, "0.5"):
        with pytest.raises(SearchError, match="min_adherence"):
            Target(speedup=2.0, min_adherence=bad).check()
    target = Target(speedup=2.0, min_adherence=0.8)
    target.check()
    assert target.as_dict() == {"speedup": 2.0, "min_adherence": 0.8}
    run = _Run.__new__(_Run)
    run.target = target

    def point(**change):
        values = {"speedup": 2.5, "psnr": 30.0, "adherence": 0.9, **change}
        return Point(Candidate(4, 0), actions="CEEE", mask=[True, False, False, False], **values)

    assert run.meets(point())
    assert not run.meets(point(adherence=0.7))
    assert not run.meets(point(adherence=None))
    assert not run.meets(point(speedup=1.5))


SEARCH_DIGITS = ["search", "digits-dit", "--out", "p.json", "--speedup", "2"]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["search", "shapes-dit", "--out", "p.json", "--speedup", "2"], "not shipped yet"),
        (["bench", "shapes-video", "--preset", "fora", "--out", "b"], "not shipped yet"),
        (["demo", "--model", "shapes-dit"], "not shipped yet"),
        ([*SEARCH_DIGITS, "--min-adherence", "1.5"], "1.5"),
        ([*SEARCH_DIGITS, "--min-adherence", "0.5"], "prompt judge"),
    ],
)
def test_cli_refuses_untrained_models_and_bad_adherence_floors(args, named, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from stepcache.cli import app

    monkeypatch.chdir(tmp_path)
    if "shapes" in args[1] or "shapes" in args[-1]:  # defined, its weights not (yet) in the package
        monkeypatch.setattr(zoo, "WEIGHTS", tmp_path / "no-weights")
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert named in " ".join(res.output.split())
    assert not (tmp_path / "p.json").exists()


def test_cache_dit_runs_on_sd3_through_its_documented_block_adapter():
    """cache-dit registers SD3 by pipeline name only; on the bare transformer it gets the
    BlockAdapter its docs describe, with the forward pattern read from one block call (SD3's
    joint blocks return (encoder, hidden): Pattern_1, as cache-dit's own SD3 adapter says)."""
    pytest.importorskip("cache_dit")
    from stepcache.bench.peers import Unavailable, peer_runs

    pipe = _tiny_pipe("shapes-dit")
    pipe.default_steps, pipe.default_guidance = 4, 3.0
    runs = peer_runs(pipe, ["cache-dit"])
    refused = [r for r in runs if isinstance(r, Unavailable)]  # spans wider than this tiny stack
    assert all("must leave a middle block" in r.reason for r in refused)
    runs = [r for r in runs if not isinstance(r, Unavailable)]
    assert runs and {r.params["block_adapter"]["forward_pattern"] for r in runs} == {"Pattern_1"}

    def gen():
        seed = torch.Generator().manual_seed(0)
        return pipe(prompt=["a red circle"], num_inference_steps=4, generator=seed)

    before = gen().images
    runs[0].attach(pipe)
    try:
        with runs[0].generation(pipe):
            assert np.isfinite(gen().images).all()
    finally:
        runs[0].detach(pipe)
    assert np.array_equal(gen().images, before)


def test_caption_tokens_carry_their_positions():
    from stepcache.zoo.text import TOKENS, encode_tokens, position_codes

    codes = position_codes()
    assert codes.shape == (TOKENS, 384)
    assert torch.allclose(codes.pow(2).mean(dim=1), torch.ones(TOKENS), atol=1e-5)  # unit RMS each
    assert not torch.allclose(codes[1], codes[2])
    tokens, pooled = encode_tokens(["a red circle", ""])
    words = (tokens[0] - codes).norm(dim=1)  # what is left of each token is unit RMS, or nothing
    used = int((tokens[0].abs().sum(dim=1) > 0).sum())
    assert 3 < used < TOKENS
    assert torch.allclose(words[:used], torch.full((used,), 384**0.5), atol=1e-3)
    assert torch.all(tokens[0, used:] == 0)
    swapped, _ = encode_tokens(
        ["a red circle on the left of a blue square", "a blue square on the left of a red circle"]
    )
    assert not torch.allclose(swapped[0], swapped[1])


def test_committed_training_weights_fit_their_model_and_continue_a_run():
    """training/KEY holds the weights the next run starts from (--init-from): they must still fit
    the model as it is defined, or that run would refuse them after the data loads."""
    from pathlib import Path

    from stepcache.zoo.train import check_init

    root = Path(__file__).resolve().parent.parent / "training"
    folders = [d for d in root.iterdir() if d.is_dir()]
    assert folders
    for folder in folders:
        check_init(MODELS[folder.name], folder)
        pipe = zoo.load(folder.name, weights_dir=folder)
        out = pipe(prompt=["a red circle"], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
        assert np.isfinite(out.images).all()


def test_demo_reports_adherence_of_both_rows_on_a_shapes_model(tmp_path):
    """The demo judges a shapes model's full-compute and accelerated images against their captions
    (the same numbers the judge gives those images), and has nothing to judge on a class model."""
    import json

    from stepcache.demo import conditions, run_demo

    result = run_demo(
        "shapes-dit", policy="adams-bashforth", steps=6, samples=4, repeats=1, out_dir=tmp_path / "d"
    )
    pipe = zoo.load("shapes-dit")
    cond = conditions(pipe, 4)
    gen = torch.Generator().manual_seed(0)
    full = pipe(**cond, num_inference_steps=6, guidance_scale=pipe.default_guidance, generator=gen).images
    assert result["adherence"]["reference"] == shapes.accuracy(cond["prompt"], full)["all"]
    assert 0.0 <= result["adherence"]["accelerated"] <= 1.0
    assert json.loads((tmp_path / "d" / "result.json").read_text())["adherence"] == result["adherence"]
    plain = run_demo("digits-dit", steps=4, samples=2, repeats=1, out_dir=tmp_path / "digits")
    assert plain["adherence"] is None
