"""The shipped digits-dit model: loads offline, deterministic, trains and resumes."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stepcache import zoo
from stepcache.demo import conditions
from stepcache.zoo.classifier import classifier_for
from stepcache.zoo.models import TrainConfig
from stepcache.zoo.train import train


def test_shipped_model_loads_offline_and_generates(digits_pipe):
    images = digits_pipe(
        class_labels=[0, 1, 2], num_inference_steps=5, generator=torch.Generator().manual_seed(0)
    ).images
    assert images.shape == (3, 8, 8, 1)
    assert images.dtype == np.float32
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    again = digits_pipe(
        class_labels=[0, 1, 2], num_inference_steps=5, generator=torch.Generator().manual_seed(0)
    ).images
    assert np.array_equal(images, again)
    other = digits_pipe(
        class_labels=[0, 1, 2], num_inference_steps=5, generator=torch.Generator().manual_seed(1)
    ).images
    assert not np.array_equal(images, other)


SHAPES = {
    "digits-dit": (8, 8, 1),
    "fmnist-dit": (28, 28, 1),
    "fmnist-dit-s": (28, 28, 1),
    "fmnist-unet": (28, 28, 1),
    "emoji-dit": (32, 32, 3),
    "shapes-dit": (32, 32, 3),
    "shapes-video": (32, 8 * 32, 3),  # a video's image is its filmstrip
}


def test_every_zoo_model_is_shipped(monkeypatch, tmp_path):
    assert [k for k in zoo.names() if zoo.shipped(k)] == zoo.names() == list(SHAPES)
    monkeypatch.setattr(zoo, "WEIGHTS", tmp_path)  # a defined model whose weights are not there
    assert "not shipped yet" in zoo.model_problem("shapes-dit")
    with pytest.raises(FileNotFoundError, match="zoo train shapes-dit"):
        zoo.load("shapes-dit")


@pytest.mark.parametrize("key", zoo.names())
def test_every_zoo_model_is_shipped_loads_offline_and_is_deterministic(key, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert zoo.info(key)["shipped"], f"{key} weights are not shipped"
    assert "Training command" in zoo.info(key)["card"]
    pipe = zoo.load(key)
    cond = conditions(pipe, 3)

    def run(seed):
        return pipe(**cond, num_inference_steps=3, generator=torch.Generator().manual_seed(seed)).images

    images = run(0)
    assert images.shape == (3, *SHAPES[key])
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert np.array_equal(images, run(0))
    assert not np.array_equal(images, run(1))
    files = [p for p in zoo.model_dir(key).iterdir() if p.suffix == ".safetensors"]
    assert files and all(p.stat().st_size <= 15 * 2**20 for p in files)


@pytest.mark.parametrize("key", ["fmnist-dit", "fmnist-unet"])
def test_fashion_models_draw_the_requested_class(key):
    pipe = zoo.load(key)
    labels = [i % 10 for i in range(100)]
    images = pipe(class_labels=labels, generator=torch.Generator().manual_seed(3)).images
    assert classifier_for(key).accuracy(images, labels) >= 0.85


def test_emoji_prompts_and_embeddings_agree():
    from stepcache.zoo.text import encode

    pipe = zoo.load("emoji-dit")
    prompts = ["red apple", "snowman"]
    a = pipe(prompt=prompts, num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images
    b = pipe(
        prompt_embeds=encode(prompts), num_inference_steps=3, generator=torch.Generator().manual_seed(0)
    ).images
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="prompt"):
        pipe(prompt=[])


def test_shipped_model_draws_the_requested_digits(digits_pipe):
    labels = [i % 10 for i in range(60)]
    images = digits_pipe(class_labels=labels, generator=torch.Generator().manual_seed(7)).images
    assert classifier_for("digits-dit").accuracy(images, labels) >= 0.9


def test_output_types_and_bad_arguments(digits_pipe):
    pt = digits_pipe(class_labels=[3], num_inference_steps=2, output_type="pt").images
    assert isinstance(pt, torch.Tensor) and pt.shape == (1, 8, 8, 1)
    pil = digits_pipe(class_labels=[3], num_inference_steps=2, output_type="pil").images
    assert pil[0].size == (8, 8)
    for kwargs, match in [
        ({"class_labels": [10]}, "class_labels"),
        ({"class_labels": []}, "at least one"),
        ({"class_labels": [1], "num_inference_steps": 0}, "num_inference_steps"),
        ({"class_labels": [1], "output_type": "latent"}, "output_type"),
    ]:
        with pytest.raises(ValueError, match=match):
            digits_pipe(**kwargs)


def test_unknown_model_and_missing_weights(tmp_path):
    with pytest.raises(KeyError, match="available: digits-dit"):
        zoo.load("imagenet-dit")
    with pytest.raises(FileNotFoundError, match="stepcache zoo train digits-dit"):
        zoo.load("digits-dit", weights_dir=tmp_path)


def test_training_runs_and_resumes_to_the_same_weights(tmp_path):
    cfg = dict(steps=6, batch_size=8, limit_images=64, checkpoint_every=2, warmup=2)
    straight = tmp_path / "straight"
    train("digits-dit", straight, TrainConfig(**cfg))

    interrupted = tmp_path / "interrupted"

    def stop_at_5(step, total, loss):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train("digits-dit", interrupted, TrainConfig(**cfg), progress=stop_at_5)
    assert (interrupted / "checkpoint.safetensors").exists()  # written at step 4
    assert not (interrupted / "model.safetensors").exists()
    seen = []
    info = train("digits-dit", interrupted, TrainConfig(**cfg), progress=lambda s, n, loss: seen.append(s))
    assert seen == [5, 6]  # resumed after the step-4 checkpoint
    assert not (interrupted / "checkpoint.safetensors").exists()
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(interrupted / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert info["final_loss"] > 0
    assert info["cpu_counted_from_step"] == 0 and 0 < info["train_cpu_seconds"]
    pipe = zoo.load("digits-dit", weights_dir=interrupted)
    assert pipe(class_labels=[1], num_inference_steps=2).images.shape == (1, 8, 8, 1)


def test_a_checkpoint_without_cpu_accounting_counts_cpu_from_where_it_resumes(tmp_path):
    """Checkpoints written before CPU time was recorded still resume; the CPU count then starts
    at the checkpoint's step, and train.json says so."""
    from safetensors.torch import save_file

    cfg = dict(steps=4, batch_size=8, limit_images=64, checkpoint_every=2, warmup=2)

    def stop_at_3(step, total, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train("digits-dit", tmp_path, TrainConfig(**cfg), progress=stop_at_3)
    ckpt = tmp_path / "checkpoint.safetensors"
    tensors, meta = load_file(str(ckpt)), _checkpoint_meta(ckpt)
    assert float(meta.pop("cpu")) > 0 and meta.pop("cpu_from") == "0"
    save_file(tensors, str(ckpt), metadata=meta)  # as an older version wrote it
    info = train("digits-dit", tmp_path, TrainConfig(**cfg))
    assert info["cpu_counted_from_step"] == 2 and info["train_cpu_seconds"] > 0


def _checkpoint_meta(path):
    import json

    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + size])["__metadata__"]


def test_domain_classifiers():
    fashion = classifier_for("fmnist-dit")
    assert fashion.info["test_accuracy"] >= 0.88  # measured on the 10,000 Fashion-MNIST test images
    images = np.random.default_rng(0).random((5, 28, 28, 1), dtype=np.float32)
    assert fashion.features(images).shape == (5, 128)
    assert fashion.predict(images).shape == (5,)
    digits = classifier_for("digits-dit")
    assert digits.info["test_accuracy"] >= 0.95
    with pytest.raises(ValueError, match="no feature layer"):
        digits.features(np.zeros((1, 8, 8, 1)))
    with pytest.raises(KeyError):
        classifier_for("imagenet")


def test_training_continues_from_given_weights(tmp_path):
    cfg = dict(steps=2, batch_size=8, limit_images=64, warmup=1)
    first = tmp_path / "first"
    train("digits-dit", first, TrainConfig(**cfg))
    start = load_file(str(first / "model.safetensors"))
    # A learning rate of zero: the continued run must end exactly where it started.
    info = train("digits-dit", tmp_path / "continued", TrainConfig(**{**cfg, "lr": 0.0}), init_from=first)
    continued = load_file(str(tmp_path / "continued" / "model.safetensors"))
    assert all(torch.equal(start[k], continued[k]) for k in start)
    assert info["init_from"]["weights"] == "first" and info["init_from"]["prior"]["train"]["steps"] == 2
    with pytest.raises(ValueError, match="no model.safetensors"):
        train("digits-dit", tmp_path / "x", TrainConfig(**cfg), init_from=tmp_path / "missing")
    with pytest.raises(ValueError, match="not fmnist-dit's architecture"):
        train("fmnist-dit", tmp_path / "y", TrainConfig(**cfg), init_from=first)
    assert not (tmp_path / "y").exists()  # refused before anything was written

    # A checkpoint left by a run from random weights must not silently replace --init-from.
    leftover = tmp_path / "leftover"

    def stop_at_3(step, total, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(
            "digits-dit",
            leftover,
            TrainConfig(**{**cfg, "steps": 4, "checkpoint_every": 2}),
            progress=stop_at_3,
        )
    with pytest.raises(ValueError, match="started from random weights"):
        train(
            "digits-dit", leftover, TrainConfig(**{**cfg, "steps": 4, "checkpoint_every": 2}), init_from=first
        )
