"""Training data for the caption-conditioned zoo models (shapes-dit, shapes-video).

Drawings are kept as bytes and captions as indices into a table of distinct captions, so a
dataset of 50,000 images costs 150 MB, not the 1.2 GB its per-token embeddings would; a batch
is made float and looked up when it is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import shapes


@dataclass(frozen=True)
class CaptionBatch:
    """Caption embeddings of a batch: per token (B, L, 384) and pooled (B, 384)."""

    tokens: torch.Tensor
    pooled: torch.Tensor

    def dropped(self, drop: torch.Tensor) -> CaptionBatch:
        """The rows where ``drop`` is true replaced by the empty caption (all zeros)."""
        keep = (~drop).to(self.tokens.dtype)
        return CaptionBatch(self.tokens * keep.view(-1, 1, 1), self.pooled * keep.view(-1, 1))


def caption_model_call(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, caption: CaptionBatch):
    """The denoiser's output for captioned input: an SD3 transformer (it has a pooled projection)
    takes the tokens and the pooled embedding, a Wan transformer the tokens."""
    extra = {"pooled_projections": caption.pooled} if model.config.get("pooled_projection_dim") else {}
    return model(x, encoder_hidden_states=caption.tokens, timestep=t, **extra).sample


class ByteImages:
    """uint8 drawings (N, H, W, 3) or (N, F, H, W, 3), indexed as float (B, 3, H, W) or
    (B, 3, F, H, W) in [-1, 1]: what the training loop indexes."""

    def __init__(self, data: np.ndarray):
        self.data = torch.from_numpy(np.ascontiguousarray(data))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, slice):
            return ByteImages(self.data[idx].numpy())  # type: ignore[return-value]
        x = self.data[idx].float() / 127.5 - 1.0
        return x.movedim(-1, 1).contiguous()


class Captions:
    """Per-sample caption indices into a table of distinct captions and their embeddings."""

    def __init__(self, texts: list[str]):
        from .text import encode_tokens

        table = sorted(set(texts))
        where = {t: i for i, t in enumerate(table)}
        self.table = table
        self.ids = torch.tensor([where[t] for t in texts], dtype=torch.long)
        self.tokens, self.pooled = encode_tokens(table)

    @property
    def shape(self) -> tuple[int, ...]:
        return (int(self.ids.shape[0]),)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            sub = object.__new__(Captions)
            sub.table, sub.tokens, sub.pooled, sub.ids = self.table, self.tokens, self.pooled, self.ids[idx]
            return sub
        ids = self.ids[idx]
        return CaptionBatch(self.tokens[ids], self.pooled[ids])


IMAGE_MIX = {"single": 0.3, "pair": 0.7}
IMAGE_COUNT = 50_000
VIDEO_COUNT = 20_000


def load_shapes_images(count: int = IMAGE_COUNT, seed: int = 0) -> tuple[ByteImages, Captions]:
    images, texts = shapes.dataset(IMAGE_MIX, count, seed=seed, split="train")
    return ByteImages(images), Captions(texts)


def load_shapes_video(count: int = VIDEO_COUNT, seed: int = 0) -> tuple[ByteImages, Captions]:
    videos, texts = shapes.dataset({"video": 1.0}, count, seed=seed, split="train")
    return ByteImages(videos), Captions(texts)
