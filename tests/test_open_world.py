"""Step- and guidance-level rules on denoisers the runtime has no family adapter for: a module of
any class, a diffusers class without an adapter, and a plain k-diffusion style callable."""

from __future__ import annotations

import pytest
import tiny
import torch
from torch import nn

import stepcache
from stepcache import UnsupportedModelError
from stepcache.adapters import adapter_for
from stepcache.runtime import handle_of


class Denoiser(nn.Module):
    """A small denoiser with k-diffusion style argument names."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(9, 32), nn.SiLU(), nn.Linear(32, 8))

    def forward(self, latents: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        s = sigma.reshape(-1, 1).expand(latents.shape[0], 1)
        return self.net(torch.cat([latents + cond, s], dim=1))


def _euler(model, x: torch.Tensor, cond: torch.Tensor, steps: int = 8) -> torch.Tensor:
    for i in range(steps):
        sigma = torch.full((x.shape[0],), 1.0 - i / steps)
        x = x - model(x, sigma, cond=cond) / steps
    return x


def _cfg_euler(model, x: torch.Tensor, cond: torch.Tensor, steps: int = 8, g: float = 3.0) -> torch.Tensor:
    """Batched classifier-free guidance, unconditional half first (the diffusers layout)."""
    for i in range(steps):
        sigma = torch.full((2 * x.shape[0],), 1.0 - i / steps)
        both = model(torch.cat([x, x]), sigma, cond=torch.cat([torch.zeros_like(cond), cond]))
        u, c = both.chunk(2)
        x = x - (u + g * (c - u)) / steps
    return x


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)


@torch.no_grad()
def test_a_step_rule_runs_on_a_module_of_any_class(data) -> None:
    x, cond = data
    model = Denoiser()
    reference = _euler(model, x, cond)
    handle = stepcache.enable(model, "static-interval")
    assert handle.adapter.family == "generic" and handle.adapter.hidden_arg == "latents"
    with handle.generation(num_steps=8):
        fast = _euler(model, x, cond)
    stats = handle.stats()
    assert stats["actions"].count("E") >= 2 and stats["computed"] < 8
    assert torch.isfinite(fast).all() and not torch.equal(fast, reference)
    # batch == singles: each sample alone gets the same answer as in the batch
    for i in range(3):
        with handle.generation(num_steps=8):
            alone = _euler(model, x[i : i + 1], cond[i : i + 1])
        torch.testing.assert_close(alone[0], fast[i], rtol=1e-5, atol=1e-6)
    stepcache.disable(model)
    assert handle_of(model) is None and torch.equal(_euler(model, x, cond), reference)


@torch.no_grad()
def test_off_is_bit_exact_on_a_generic_module(data) -> None:
    x, cond = data
    model = Denoiser()
    reference = _euler(model, x, cond)
    handle = stepcache.enable(model, None)
    with handle.generation(num_steps=8):
        assert torch.equal(_euler(model, x, cond), reference)


@torch.no_grad()
def test_a_guidance_rule_leaves_out_unconditional_rows_of_a_generic_module(data) -> None:
    x, cond = data
    model = Denoiser()
    reference = _cfg_euler(model, x, cond)
    handle = stepcache.enable(model, "guidance-interval")
    with handle.generation(num_steps=8, cfg="uncond_first"):
        fast = _cfg_euler(model, x, cond)
    stepcache.disable(model)
    row_actions = handle.stats()["row_actions"]
    left_out = [rows for rows in row_actions if "G" in rows]
    assert left_out and all(rows[:3] == "GGG" and rows[3:] == "CCC" for rows in left_out)
    assert torch.isfinite(fast).all() and not torch.equal(fast, reference)


@torch.no_grad()
def test_a_plain_callable_in_a_k_diffusion_loop(data) -> None:
    x, cond = data
    net = Denoiser()

    def model(x: torch.Tensor, sigma: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        return net(x, sigma, extra["cond"])

    reference = _euler(model, x, cond)
    handle = stepcache.enable(model, "taylorseer")
    assert handle.adapter.hidden_arg == "x" and handle.adapter.timestep_arg == "sigma"
    with handle.generation(num_steps=8):
        fast = _euler(handle, x, cond)
    assert "E" in handle.stats()["actions"]
    assert torch.isfinite(fast).all() and (fast - reference).abs().max() < 0.5
    stepcache.disable(model)  # finds the module enable() wrapped around the function
    assert not handle.active


def test_a_sample_argument_that_cannot_be_found_asks_for_sample_arg() -> None:
    def model(*args: torch.Tensor) -> torch.Tensor:
        return args[0]

    with pytest.raises(UnsupportedModelError, match=r"sample_arg='NAME'"):
        stepcache.enable(model, "static-interval")
    with pytest.raises(UnsupportedModelError, match=r"sample_arg='noise'.*latents, sigma, cond"):
        stepcache.enable(Denoiser(), "static-interval", sample_arg="noise")
    with pytest.raises(UnsupportedModelError, match="has a family adapter"):
        from tiny import make

        stepcache.enable(make("dit"), "static-interval", sample_arg="hidden_states")


@torch.no_grad()
def test_a_named_sample_argument_is_used(data) -> None:
    x, cond = data

    class Odd(nn.Module):
        def forward(self, cond: torch.Tensor, noisy: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
            return noisy * level.reshape(-1, 1) + cond

    model = Odd()
    handle = stepcache.enable(model, "static-interval", sample_arg="noisy", timestep_arg="level")
    assert (handle.adapter.hidden_arg, handle.adapter.timestep_arg) == ("noisy", "level")
    with handle.generation(num_steps=4):
        for i in range(4):
            model(cond, x, torch.full((3,), 1.0 - i / 4))
    assert handle.stats()["actions"] == ["C", "C", "E", "C"]


@torch.no_grad()
def test_a_module_without_a_tensor_output_is_refused_and_left_untouched(data) -> None:
    x, cond = data

    class Chatty(Denoiser):
        def forward(self, latents, sigma, cond):  # type: ignore[override]
            return {"prediction": super().forward(latents, sigma, cond)}

    model = Chatty()
    original = model.forward
    handle = stepcache.enable(model, "static-interval")
    with pytest.raises(UnsupportedModelError, match="returned dict, not a tensor"):
        with handle.generation(num_steps=4):
            model(x, torch.ones(3), cond)
    assert handle_of(model) is None and model.forward == original and "forward" not in vars(model)


@torch.no_grad()
def test_a_sample_that_is_not_a_tensor_is_named(data) -> None:
    _, cond = data
    model = Denoiser()
    handle = stepcache.enable(model, "static-interval")
    with pytest.raises(UnsupportedModelError, match="'latents' is list"):
        with handle.generation(num_steps=4):
            model([1.0, 2.0], torch.ones(3), cond)
    assert handle_of(model) is None


@pytest.mark.parametrize("thing", [object(), "a string", 3])
def test_what_is_neither_module_nor_callable_is_refused(thing) -> None:
    with pytest.raises(UnsupportedModelError, match="neither a torch module, a callable"):
        stepcache.enable(thing, "static-interval")


# ---- diffusers classes without a family adapter: stack and streams discovered ----------------
def _loop(family: str, model: nn.Module, rows: slice = slice(None), steps: int = 6) -> torch.Tensor:
    """tiny.sample's loop on rows of the batch-2 inputs (so a single is the same sample)."""
    hidden_arg, x, kwargs = tiny.inputs(family, 2)
    x = x[rows]
    kwargs = {
        k: v[rows] if isinstance(v, (torch.Tensor, list)) and len(v) == 2 else v for k, v in kwargs.items()
    }
    for i in range(steps):
        x = tiny.euler(x, tiny.call(family, model, hidden_arg, x, 1000.0 * (1 - i / steps), kwargs), steps)
    return torch.stack(x) if isinstance(x, list) else x


@torch.no_grad()
@pytest.mark.parametrize("family", tiny.GENERIC)
def test_discovered_block_stack_takes_block_rules(family: str) -> None:
    model = tiny.make(family)
    given = tiny.ENABLE_ARGS.get(family, {})  # what a user names for a class the runtime cannot read
    reference = _loop(family, model)
    with stepcache.enable(model, None, **given).generation(num_steps=6):
        assert torch.equal(_loop(family, model), reference)  # off: bit-exact

    handle = stepcache.enable(model, "static-interval", **given)
    with handle.generation(num_steps=6):
        stepped = _loop(family, model)
    assert handle.stats()["actions"] == ["C", "C", "E", "C", "E", "C"] and torch.isfinite(stepped).all()

    if adapter_for(model).family == "UNet":  # no linear stack: DeepCache, the U-Net's block method
        handle = stepcache.enable(model, "deepcache", **given)
        with handle.generation(num_steps=6):
            deep = _loop(family, model)
        assert handle.stats()["actions"] == ["C", "C", "P", "P", "C", "P"] and torch.isfinite(deep).all()
        for i in range(2):  # batch == singles
            with handle.generation(num_steps=6):
                alone = _loop(family, model, slice(i, i + 1))
            torch.testing.assert_close(alone, deep[i : i + 1], rtol=1e-4, atol=1e-5)
        stepcache.disable(model)
        assert torch.equal(_loop(family, model), reference)
        return
    skip_middle = stepcache.presets.get("dbcache", threshold=10.0, max_consecutive=100, warmup=1)
    handle = stepcache.enable(model, skip_middle, **given)
    if family in tiny.BLOCK_REFUSED:  # refused at the first call, with the reason; model untouched
        with pytest.raises(UnsupportedModelError, match=tiny.BLOCK_REFUSED[family]):
            with handle.generation(num_steps=6):
                _loop(family, model)
        assert handle_of(model) is None and torch.equal(_loop(family, model), reference)
        return
    with handle.generation(num_steps=6):
        batched = _loop(family, model)
    assert handle.stats()["actions"] == ["C", "P", "P", "P", "P", "P"] and torch.isfinite(batched).all()
    assert not torch.equal(batched, reference)
    for i in range(2):  # batch == singles: a sample alone is answered as in the batch
        with handle.generation(num_steps=6):
            alone = _loop(family, model, slice(i, i + 1))
        torch.testing.assert_close(alone, batched[i : i + 1], rtol=1e-4, atol=1e-5)
    stepcache.disable(model)
    assert torch.equal(_loop(family, model), reference)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + torch.tanh(self.lin(hidden_states))


class Interleaved(nn.Module):
    """Blocks with another module between them (skipping a span of the list would skip it too),
    or blocks called out of order."""

    def __init__(self, order: list[int] | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block() for _ in range(4)])
        self.mix = nn.Linear(8, 8)
        self.order = order

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        h = hidden_states
        for i in self.order or range(4):
            h = self.blocks[i](h)
            if self.order is None:
                h = self.mix(h)
        return h


@torch.no_grad()
@pytest.mark.parametrize(
    ("order", "message"),
    [(None, "changes between one block's output"), ([0, 2, 1, 3], "called once in order")],
)
def test_a_list_that_is_not_a_chain_is_refused_and_the_model_left_untouched(order, message) -> None:
    model = Interleaved(order)
    handle = stepcache.enable(model, "dbcache")
    with pytest.raises(UnsupportedModelError, match=f"Interleaved.blocks: .*{message}"):
        with handle.generation(num_steps=4):
            model(torch.randn(2, 8), torch.ones(2))
    assert handle_of(model) is None and "forward" not in vars(model)
    assert all("forward" not in vars(b) for b in model.blocks)


class LoopPipeline:
    """The shape of a diffusers pipeline stepcache relies on: a ``transformer`` attribute, a
    progress bar per generation, ``do_classifier_free_guidance``. Guidance runs as one batched
    call (unconditional half first) or as two calls per step (conditional first)."""

    do_classifier_free_guidance = True

    def __init__(self, model: nn.Module, separate: bool) -> None:
        self.transformer, self.separate = model, separate

    def progress_bar(self, iterable=None, total=None):
        from tqdm.auto import tqdm

        return tqdm(iterable=iterable, total=total, disable=True)

    def __call__(self, x: torch.Tensor, cond: torch.Tensor, steps: int = 8, g: float = 3.0) -> torch.Tensor:
        null = torch.zeros_like(cond)
        with self.progress_bar(total=steps) as bar:
            for i in range(steps):
                sigma = torch.full((x.shape[0],), 1.0 - i / steps)
                if self.separate:
                    c = self.transformer(x, sigma, cond=cond)
                    u = self.transformer(x, sigma, cond=null)
                else:
                    both = self.transformer(torch.cat([x, x]), sigma.repeat(2), cond=torch.cat([null, cond]))
                    u, c = both.chunk(2)
                x = x - (u + g * (c - u)) / steps
                bar.update()
        return x


@torch.no_grad()
@pytest.mark.parametrize("separate", [False, True])
def test_an_unknown_pipeline_s_guidance_calls_are_recognised(data, separate: bool) -> None:
    """Batched or separate, the runtime tells from step 0's calls and leaves out the
    unconditional rows (batched) or the unconditional call (separate) where the rule says."""
    x, cond = data
    pipe = LoopPipeline(Denoiser(), separate)
    reference = pipe(x, cond)
    handle = stepcache.enable(pipe, stepcache.presets.get("guidance-interval", start=0.0, end=0.5))
    fast = pipe(x, cond)
    stats = handle.stats()
    stepcache.disable(pipe)
    if separate:  # the conditional call, then the unconditional one, per step
        assert stats["actions"] == ["C"] * 9 + ["G", "C", "G", "C", "G", "C", "G"]
    else:
        assert stats["row_actions"] == ["CCCCCC"] * 4 + ["GGGCCC"] * 4
    assert torch.isfinite(fast).all() and not torch.equal(fast, reference)
    assert torch.equal(pipe(x, cond), reference)


class Shrinking(Interleaved):
    """A chain at the first call (the probe passes); later calls leave out block 2."""

    def __init__(self) -> None:
        super().__init__(order=[0, 1, 2, 3])
        self.calls = 0

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.order = [0, 1, 2, 3] if self.calls <= 2 else [0, 1, 3]
        return super().forward(hidden_states, timestep)


@torch.no_grad()
def test_a_stack_that_changes_between_calls_is_refused_and_the_model_left_untouched() -> None:
    model = Shrinking()
    handle = stepcache.enable(model, "dbcache")
    with pytest.raises(
        UnsupportedModelError, match=r"block stack changed between calls \(called block 3 where"
    ):
        with handle.generation(num_steps=4):
            for _ in range(4):
                model(torch.randn(2, 8), torch.ones(2))
    assert handle_of(model) is None and "forward" not in vars(model)
    assert all("forward" not in vars(b) for b in model.blocks)


@torch.no_grad()
def test_module_caches_keep_each_call_of_a_module_called_twice_per_forward() -> None:
    """CogView4 runs one feed-forward on the image tokens and again on the text tokens; FORA
    replays each call's own output (one cache per module would hand 16 image tokens to 5 text)."""
    model = tiny.make("cogview4")
    handle = stepcache.enable(model, stepcache.presets.get("fora", interval=2))
    with handle.generation(num_steps=6):
        out = _loop("cogview4", model, slice(0, 1))
    stepcache.disable(model)
    assert handle.stats()["actions"] == ["C", "C", "P", "C", "P", "C"] and torch.isfinite(out).all()


@torch.no_grad()
def test_a_hand_written_loop_says_its_guidance_calls_are_separate(data) -> None:
    x, cond = data
    model = Denoiser()
    handle = stepcache.enable(model, stepcache.presets.get("guidance-interval", start=0.0, end=0.5))
    with pytest.raises(ValueError, match="calls_per_step=2"):
        with handle.generation(num_steps=8, cfg="separate"):
            pass
    with handle.generation(num_steps=8, calls_per_step=2, cfg="separate"):
        for i in range(8):
            sigma = torch.full((3,), 1.0 - i / 8)
            c, u = model(x, sigma, cond=cond), model(x, sigma, cond=torch.zeros_like(cond))
            x = x - (u + 3.0 * (c - u)) / 8
    stepcache.disable(model)
    assert handle.stats()["actions"] == ["C"] * 8 + ["C", "G"] * 4  # no step-0 wait: it was said
    assert torch.isfinite(x).all()
