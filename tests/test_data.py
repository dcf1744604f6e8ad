"""Fashion-MNIST loading from IDX files (small files made here; the real set is a Debian package)."""

import gzip

import numpy as np
import pytest
import torch

from stepcache.zoo import data


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fmnist(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, size=(n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, size=(n,)))
    monkeypatch.setenv("STEPCACHE_FMNIST_DIR", str(tmp_path))
    return tmp_path


def test_loads_idx_files_scaled_to_minus_one_one(fake_fmnist):
    x, y = data.load_fashion_mnist("train")
    assert x.shape == (12, 1, 28, 28) and y.shape == (12,)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    raw = data._read_idx(fake_fmnist / "train-images-idx3-ubyte.gz")
    torch.testing.assert_close(x[:, 0], torch.from_numpy(raw / 255.0 * 2 - 1).float())
    assert data.load_fashion_mnist("test")[0].shape == (5, 1, 28, 28)


def test_missing_data_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPCACHE_FMNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(data.DataMissingError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist()


def test_corrupt_and_mismatched_files(fake_fmnist):
    with pytest.raises(ValueError, match="split"):
        data.load_fashion_mnist("val")
    with gzip.open(fake_fmnist / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"not an idx file")
    with pytest.raises(ValueError, match="IDX"):
        data.load_fashion_mnist("train")
    _write_idx(fake_fmnist / "train-labels-idx1-ubyte.gz", np.zeros(3))
    with pytest.raises(ValueError, match="12 images but 3 labels"):
        data.load_fashion_mnist("train")


def test_fmnist_training_runs_at_tiny_scale(fake_fmnist, tmp_path):
    from stepcache import zoo
    from stepcache.zoo.models import TrainConfig
    from stepcache.zoo.train import train

    for key in ("fmnist-dit", "fmnist-unet"):
        out = tmp_path / key
        info = train(key, out, TrainConfig(steps=2, batch_size=4, checkpoint_every=1))
        assert np.isfinite(info["final_loss"])
        pipe = zoo.load(key, weights_dir=out)
        images = pipe(
            class_labels=[0, 9], num_inference_steps=2, generator=torch.Generator().manual_seed(0)
        ).images
        assert images.shape == (2, 28, 28, 1) and np.isfinite(images).all()


def test_missing_emoji_names_the_npm_command(tmp_path, monkeypatch):
    from stepcache.zoo import text

    monkeypatch.setenv("STEPCACHE_EMOJI_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        data.DataMissingError, match="npm install --prefix ~/.cache/stepcache/npm emoji-datasource-google"
    ):
        text.emoji_dir()


def test_emoji_loader_on_a_tiny_package(tmp_path, monkeypatch):
    import json

    from PIL import Image

    from stepcache.zoo import text

    img_dir = tmp_path / "img" / "google" / "64"
    img_dir.mkdir(parents=True)
    Image.new("RGBA", (64, 64), (255, 0, 0, 255)).save(img_dir / "red.png")
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(img_dir / "clear.png")
    entries = [
        {"name": "RED SQUARE", "image": "red.png", "has_img_google": True, "sort_order": 1},
        {"name": "CLEAR", "image": "clear.png", "has_img_google": True, "sort_order": 2},
        {"name": "NO IMAGE", "image": "none.png", "has_img_google": False, "sort_order": 3},
    ]
    (tmp_path / "emoji.json").write_text(json.dumps(entries))
    monkeypatch.setenv("STEPCACHE_EMOJI_DIR", str(tmp_path))
    images, captions = text.load_emoji_images(size=8)
    assert captions == ["red square", "clear"]
    assert images.shape == (2, 3, 8, 8)
    torch.testing.assert_close(images[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    torch.testing.assert_close(images[1], torch.ones(3, 8, 8))  # transparent -> white
