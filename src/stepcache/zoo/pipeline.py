"""A class-conditional flow-matching pipeline in diffusers' conventions, with classifier-free guidance.

``pipe(class_labels=[...], num_inference_steps=N, guidance_scale=g, generator=..., output_type="np")
.images`` -> float array (N, H, W, C) in [0, 1]. The unconditional half uses the null label
(index ``num_classes``) and is batched after the conditional half, as diffusers' DiTPipeline does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class _SaysGuidance:
    """``do_classifier_free_guidance`` as a property, as diffusers' newer pipelines say it: a
    runtime wrapping the pipeline reads it when the progress bar opens."""

    _guidance_scale = 1.0

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0


class ClassConditionalPipeline(_SaysGuidance, DiffusionPipeline):
    """Holds either a DiT (``transformer``) or a class-embedding UNet2DModel (``unet``).

    With CFG the batch is [conditional, unconditional (null label)], as diffusers' DiT pipeline
    orders it, whichever denoiser it holds; ``stepcache_cfg_layout`` tells stepcache so.
    """

    stepcache_cfg_layout = "uncond_last"

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        transformer: torch.nn.Module | None = None,
        unet: torch.nn.Module | None = None,
    ):
        super().__init__()
        if (transformer is None) == (unet is None):
            raise ValueError("give exactly one denoiser: transformer= (DiT) or unet= (UNet2DModel)")
        self.register_modules(scheduler=scheduler, transformer=transformer, unet=unet)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer if self.transformer is not None else self.unet

    @property
    def num_classes(self) -> int:
        config = self.denoiser.config
        if self.transformer is not None:
            return int(config.num_embeds_ada_norm)
        return int(config.num_class_embeds) - 1  # the last row is the null label

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | torch.Tensor,
        num_inference_steps: int = 20,
        guidance_scale: float = 2.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "np",
        return_dict: bool = True,
    ) -> Any:
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if labels.numel() == 0:
            raise ValueError("class_labels must name at least one class")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"class_labels must lie in [0, {self.num_classes - 1}], got {labels.tolist()}")
        _check_common(num_inference_steps, output_type)
        model = self.denoiser
        device, dtype = self._execution_device, model.dtype
        self._guidance_scale = guidance_scale
        do_classifier_free_guidance = self.do_classifier_free_guidance
        size = int(model.config.sample_size)
        shape = (labels.numel(), int(model.config.in_channels), size, size)
        x = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        labels = labels.to(device)
        model_labels = (
            torch.cat([labels, torch.full_like(labels, self.num_classes)])
            if do_classifier_free_guidance
            else labels
        )

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        with self.progress_bar(total=num_inference_steps) as bar:
            for i, t in enumerate(timesteps):
                x_in = torch.cat([x, x]) if do_classifier_free_guidance else x
                v = model(x_in, timestep=t.expand(x_in.shape[0]), class_labels=model_labels).sample
                if do_classifier_free_guidance:
                    v_cond, v_uncond = v.chunk(2)
                    v = v_uncond + guidance_scale * (v_cond - v_uncond)
                x = self.scheduler.step(v, t, x).prev_sample
                if _step_done(self.scheduler, i, len(timesteps)):
                    bar.update()

        return _finish(self, x, output_type, return_dict)


def _check_common(num_inference_steps: Any, output_type: Any) -> None:
    if (
        isinstance(num_inference_steps, bool)
        or not isinstance(num_inference_steps, int)
        or num_inference_steps < 1
    ):
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    if output_type not in ("np", "pt", "pil"):
        raise ValueError(f"output_type must be 'np', 'pt' or 'pil', got {output_type!r}")


def _step_done(scheduler: Any, i: int, calls: int) -> bool:
    """Whether evaluation ``i`` ends a scheduler step: the progress bar (stepcache's step count)
    moves once per step, as in diffusers' pipelines, so a second-order scheduler's (Heun's) two
    evaluations are two calls of one step."""
    return i == calls - 1 or (i + 1) % int(getattr(scheduler, "order", 1) or 1) == 0


def _finish(pipe: DiffusionPipeline, x: torch.Tensor, output_type: str, return_dict: bool) -> Any:
    """Latents in [-1, 1] (N, C, H, W) to images (N, H, W, C) in [0, 1] as np, pt or PIL."""
    images = ((x.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
    out: Any = images if output_type == "pt" else images.cpu().numpy()
    if output_type == "pil":
        out = pipe.numpy_to_pil(out)
    return ImagePipelineOutput(images=out) if return_dict else (out,)


class TextConditionalPipeline(_SaysGuidance, DiffusionPipeline):
    """Text-to-image flow matching with a PixArt transformer and sentence-embedding captions.

    ``pipe(prompt=[...], ...).images`` -> (N, H, W, C) in [0, 1]. With CFG the batch is
    [unconditional (zero embedding), conditional], as diffusers' PixArt pipeline orders it.
    """

    def __init__(self, transformer: torch.nn.Module, scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 4.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        prompt_embeds: torch.Tensor | None = None,
    ) -> Any:
        from .text import encode

        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("give prompt=[...] or prompt_embeds=")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not prompts or not all(isinstance(p, str) for p in prompts):
                raise ValueError("prompt must be a string or a non-empty list of strings")
            prompt_embeds = encode(prompts)
        _check_common(num_inference_steps, output_type)
        model = self.transformer
        device, dtype = self._execution_device, model.dtype
        cond = prompt_embeds.to(device=device, dtype=dtype).reshape(prompt_embeds.shape[0], 1, -1)
        self._guidance_scale = guidance_scale
        do_classifier_free_guidance = self.do_classifier_free_guidance
        emb = torch.cat([torch.zeros_like(cond), cond]) if do_classifier_free_guidance else cond
        size = int(model.config.sample_size)
        x = randn_tensor(
            (cond.shape[0], int(model.config.in_channels), size, size),
            generator=generator,
            device=device,
            dtype=dtype,
        )
        no_extra = {"resolution": None, "aspect_ratio": None}
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        with self.progress_bar(total=num_inference_steps) as bar:
            for i, t in enumerate(timesteps):
                x_in = torch.cat([x, x]) if do_classifier_free_guidance else x
                v = model(
                    x_in,
                    encoder_hidden_states=emb,
                    timestep=t.expand(x_in.shape[0]),
                    added_cond_kwargs=no_extra,
                ).sample
                if do_classifier_free_guidance:
                    v_uncond, v_cond = v.chunk(2)
                    v = v_uncond + guidance_scale * (v_cond - v_uncond)
                x = self.scheduler.step(v, t, x).prev_sample
                if _step_done(self.scheduler, i, len(timesteps)):
                    bar.update()
        return _finish(self, x, output_type, return_dict)


class CaptionPipeline(_SaysGuidance, DiffusionPipeline):
    """Text-to-image (SD3 transformer) or text-to-video (Wan transformer) flow matching with
    per-token caption embeddings (``zoo.text.encode_tokens``).

    ``pipe(prompt=[...], ...).images`` -> (N, H, W, C) in [0, 1]; for video, ``.frames`` ->
    (N, F, H, W, C) and ``.images`` the same frames side by side, (N, H, F*W, C), so that every
    image metric and grid of the harness reads a video as one filmstrip. With CFG the batch is
    [unconditional (all-zero caption), conditional] in one call.
    """

    stepcache_cfg_layout = "uncond_first"

    def __init__(self, transformer: torch.nn.Module, scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)
        self.sample_shape: tuple[int, ...] = (3, 32, 32)  # (C, H, W) or (C, F, H, W); zoo.load sets it

    @property
    def is_video(self) -> bool:
        return len(self.sample_shape) == 4

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 20,
        guidance_scale: float = 4.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "np",
        return_dict: bool = True,
    ) -> Any:
        from .captions import CaptionBatch, caption_model_call
        from .text import encode_tokens

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        _check_common(num_inference_steps, output_type)
        device, dtype = self._execution_device, self.transformer.dtype
        tokens, pooled = (t.to(device=device, dtype=dtype) for t in encode_tokens(prompts))
        self._guidance_scale = guidance_scale
        do_classifier_free_guidance = self.do_classifier_free_guidance
        if do_classifier_free_guidance:
            tokens = torch.cat([torch.zeros_like(tokens), tokens])
            pooled = torch.cat([torch.zeros_like(pooled), pooled])
        caption = CaptionBatch(tokens, pooled)
        shape = (len(prompts), *self.sample_shape)
        x = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        with self.progress_bar(total=num_inference_steps) as bar:
            for i, t in enumerate(timesteps):
                x_in = torch.cat([x, x]) if do_classifier_free_guidance else x
                v = caption_model_call(self.transformer, x_in, t.expand(x_in.shape[0]), caption)
                if do_classifier_free_guidance:
                    v_uncond, v_cond = v.chunk(2)
                    v = v_uncond + guidance_scale * (v_cond - v_uncond)
                x = self.scheduler.step(v, t, x).prev_sample
                if _step_done(self.scheduler, i, len(timesteps)):
                    bar.update()
        if not self.is_video:
            return _finish(self, x, output_type, return_dict)
        frames = ((x.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1)  # (N, F, H, W, C)
        n, f, h, w, c = frames.shape
        strip = frames.permute(0, 2, 1, 3, 4).reshape(n, h, f * w, c)
        if output_type != "pt":
            frames, strip = frames.cpu().numpy(), strip.cpu().numpy()
        if output_type == "pil":
            strip = self.numpy_to_pil(strip)
        out = VideoOutput(images=strip, frames=frames)
        return out if return_dict else (strip,)


def unstrip(images: Any, frames: int) -> Any:
    """Filmstrips (N, H, F*W, C) back to videos (N, F, H, W, C)."""
    n, h, fw, c = images.shape
    return images.reshape(n, h, frames, fw // frames, c).transpose(0, 2, 1, 3, 4)


@dataclass
class VideoOutput(ImagePipelineOutput):
    frames: Any = None
