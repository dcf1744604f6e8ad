"""The shipped digits-dit model: loads offline, deterministic, trains and resumes."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stepcache import zoo
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
    pipe = zoo.load("digits-dit", weights_dir=interrupted)
    assert pipe(class_labels=[1], num_inference_steps=2).images.shape == (1, 8, 8, 1)
