"""T-Stitch: a small model answers the first steps, the large one the rest."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.torch import save_file
from test_blocks import _count_blocks, _run

import stepcache
from stepcache import presets, zoo
from stepcache.zoo.models import build


def _save(folder, config: dict, model) -> str:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"family": "dit", "model": config}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return str(folder)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 2-block sibling of digits-dit (random weights: what it answers only has to be its own)."""
    config = {
        **json.loads((zoo.model_dir("digits-dit") / "config.json").read_text())["model"],
        "num_layers": 2,
    }
    return _save(tmp_path_factory.mktemp("s") / "digits-dit-s", config, build("dit", config))


def test_the_small_model_answers_the_first_steps_the_large_one_the_rest(digits_pipe, small):
    calls = []
    counts, hooks = _count_blocks(digits_pipe.transformer)
    handle = stepcache.enable(digits_pipe, presets.get("t-stitch", small=small, fraction=0.4))
    stand_in = handle.rules.step.model
    hooks.append(stand_in.register_forward_hook(lambda m, a, o: calls.append(1)))
    try:
        out = _run(digits_pipe, steps=10)
    finally:
        stepcache.disable(digits_pipe)
        for h in hooks:
            h.remove()
    assert len(calls) == 4 and counts == [6] * 6  # steps 0-3 small (step 0 too), 4-9 large
    assert handle.stats()["actions"] == ["P"] * 4 + ["C"] * 6
    assert np.isfinite(out).all()


def test_a_stand_in_identical_to_the_model_changes_nothing(digits_pipe, tmp_path):
    reference = _run(digits_pipe, steps=8)
    same = shutil.copytree(zoo.model_dir("digits-dit"), tmp_path / "copy")
    stepcache.enable(digits_pipe, presets.get("t-stitch", small=str(same), fraction=0.5))
    try:
        out = _run(digits_pipe, steps=8)
    finally:
        stepcache.disable(digits_pipe)
    assert np.array_equal(out, reference)


def test_a_policy_file_names_the_small_model_and_round_trips(small, tmp_path):
    pol = presets.get("t-stitch", small=small, fraction=0.25)
    pol.save(tmp_path / "p.json")
    again = stepcache.Policy.load(tmp_path / "p.json")
    assert again.rules["step"].params == {"small": small, "fraction": 0.25}


@pytest.mark.parametrize(
    ("small", "message"),
    [
        ("no-such-model", "neither a zoo key .* nor a folder with config.json and model.safetensors"),
        ("shapes-dit", "zoo model 'shapes-dit' is not shipped yet"),
    ],
)
def test_a_small_model_that_cannot_be_loaded_is_named_at_enable(
    digits_pipe, small, message, monkeypatch, tmp_path
):
    monkeypatch.setattr(zoo, "WEIGHTS", tmp_path)  # every zoo model defined, none shipped
    with pytest.raises(ValueError, match=rf"t-stitch.small: .*{message}"):
        stepcache.enable(digits_pipe, presets.get("t-stitch", small=small))
    assert stepcache.runtime.handle_of(digits_pipe.transformer) is None


def test_a_stand_in_of_another_shape_is_refused_and_the_model_left_untouched(digits_pipe, tmp_path):
    reference = _run(digits_pipe, steps=6)
    config = {
        **json.loads((zoo.model_dir("digits-dit") / "config.json").read_text())["model"],
        "out_channels": 2,
    }
    other = _save(tmp_path / "wide", config, build("dit", config))
    stepcache.enable(digits_pipe, presets.get("t-stitch", small=other))
    with pytest.raises(stepcache.UnsupportedModelError, match=r"answered \(2, 8, 8\) per sample"):
        _run(digits_pipe, steps=6)
    stepcache.disable(digits_pipe)
    assert np.array_equal(_run(digits_pipe, steps=6), reference)
