"""Other libraries' caching methods as data.

Each ``PeerMethod`` declares, for one method of one peer (diffusers' cache hooks, cache-dit's
DBCache): the setting its documentation gives a model it has no preset for, the documented sweep
of its main knob, and its tuning space (``Knob``s), all as the library's own keyword arguments. A
run's recorded parameters are the configuration it was built from, nothing written down beside
it. ``peer_runs`` lists the documented settings for a pipeline; ``bench.tune`` searches each
method's space with the budget stepcache's own search gets. A method that cannot run on the
denoiser comes back as ``Unavailable`` with why.
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from .peer_hooks import (
    _ATTENTION_NAMES,
    _BLOCK_LISTS,
    _attention_modules,
    _block_list,
    _block_reason,
    _CacheDitPeer,
    _denoiser,
    _DiffusersPeer,
    _forward_pattern,
    _Peer,
    _sea_raw_vision,
    _StepTracker,
)

PEERS = ("cache-dit", "diffusers")
PEERS_INSTALL = 'pip install "stepcache[peers]"'
_MAG_CALIBRATION_SAMPLES = 4


@dataclass(frozen=True)
class Knob:
    """One tunable argument: a range (``low``..``high``, integer or float, log-scaled or not) or a
    list of JSON values (``choices``)."""

    name: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    integer: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        if self.choices:
            picked = trial.suggest_categorical(self.name, [json.dumps(c) for c in self.choices])
            return json.loads(picked)
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)


@dataclass
class PeerRun:
    """One setting of one peer. ``attach``, then each ``pipe(...)`` inside ``generation(pipe)``, then
    ``detach``, after which the pipeline computes exactly what it did before ``attach``."""

    name: str
    peer: str
    params: dict[str, Any]
    _impl: _Peer = field(repr=False, compare=False)

    def attach(self, pipe: Any) -> None:
        self._impl.attach(pipe, self.name)

    def detach(self, pipe: Any) -> None:
        self._impl.detach(pipe)

    def generation(self, pipe: Any) -> AbstractContextManager:
        return self._impl.generation(pipe, self.name)


@dataclass
class Unavailable:
    name: str
    peer: str
    reason: str


@dataclass(frozen=True)
class PeerMethod:
    """One method of one peer, as data. ``documented(pipe)`` is the configuration its docs give a
    model they do not know; ``sweep`` overrides it, one documented setting each; ``space(pipe)``
    are the knobs a tuning search varies on top of ``documented``; ``why_not(pipe)`` says why it
    cannot run there; ``build(pipe, config)`` makes the attachable peer from a configuration."""

    peer: str
    method: str
    documented: Callable[[Any], dict[str, Any]]
    sweep: tuple[dict[str, Any], ...]
    space: Callable[[Any], tuple[Knob, ...]]
    why_not: Callable[[Any], str | None]
    build: Callable[[Any, dict[str, Any]], _Peer]
    version: Callable[[], str | None] = lambda: None
    # what the peer needed besides the configuration to run here (recorded with it)
    context: Callable[[Any], dict[str, Any]] = lambda pipe: {}
    describe: Callable[[dict[str, Any]], str] = lambda overrides: "".join(
        f" {_SHORT.get(k, k)}={_show(v)}" for k, v in overrides.items()
    )

    @property
    def label(self) -> str:
        return f"{self.peer} {self.method}"

    def run(self, pipe: Any, config: dict[str, Any], name: str | None = None, **meta: Any) -> PeerRun:
        """A run of this method built from ``config`` (the library's keyword arguments); its
        recorded parameters are ``config`` itself, the method and the library version."""
        params = {"method": self.method, **config, **self.context(pipe), **meta, self.peer: self.version()}
        return PeerRun(name or self.label, self.peer, params, self.build(pipe, dict(config)))

    def runs(self, pipe: Any) -> list[PeerRun | Unavailable]:
        """The documented sweep on ``pipe``, each named by its overrides."""
        reason = self.why_not(pipe)
        base = self.documented(pipe) if reason is None else {}
        out: list[PeerRun | Unavailable] = []
        for overrides in self.sweep:
            name = self.label + self.describe(overrides)
            if reason is not None:
                out.append(Unavailable(name, self.peer, reason))
                continue
            config = {**base, **overrides}
            try:
                out.append(self.run(pipe, config, name, peer_default=config == base))
            except ValueError as e:  # a setting this model cannot take (e.g. more blocks than it has)
                out.append(Unavailable(name, self.peer, str(e)))
        return out


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


# Run names keep the historic short forms of long keyword names.
_SHORT = {
    "spatial_attention_block_skip_range": "spatial_skip",
    "taylor_factors_dtype": "dtype",
}


def peer_methods(peers: list[str] | str) -> list[PeerMethod]:
    """The methods of the named peers ("diffusers", "cache-dit"), in a fixed order; "PEER:METHOD"
    (e.g. "diffusers:FasterCache") names one method of a peer."""
    if isinstance(peers, str):
        peers = [peers]
    bad = [p for p in peers if p.partition(":")[0] not in PEERS]
    if bad:
        raise ValueError(f"unknown peer(s) {', '.join(map(repr, bad))}; valid peers: {', '.join(PEERS)}")
    wanted: dict[str, set[str] | None] = {}  # peer -> its methods asked for (None: all)
    for item in peers:
        peer, _, method = item.partition(":")
        known = [m.method for m in METHODS if m.peer == peer]
        if method and method not in known:
            raise ValueError(f"{peer} has no method {method!r}; its methods: {', '.join(known)}")
        if not method:
            wanted[peer] = None
        elif wanted.get(peer, set()) is not None:
            wanted[peer] = {*wanted.get(peer, set()), method}
    return [
        m
        for p, methods in wanted.items()
        for m in METHODS
        if m.peer == p and (methods is None or m.method in methods)
    ]


def peer_runs(pipe: Any, peers: list[str] | str) -> list[PeerRun | Unavailable]:
    """All documented settings of the named peers' methods for this pipeline."""
    return [run for method in peer_methods(peers) for run in method.runs(pipe)]


# ------------------------------------------------------------------------------------------ diffusers


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def _steps(pipe: Any) -> int:
    return int(getattr(pipe, "default_steps", 20))


def _guidance(pipe: Any) -> float:
    return float(getattr(pipe, "default_guidance", 2.0))


def _hook_missing(method: str) -> str | None:
    import diffusers.hooks as dh

    if getattr(dh, f"{method}Config", None) is None:
        return f"{method}: not in the installed diffusers {_diffusers_version()}"
    return None


def _block_hook_reason(method: str) -> Callable[[Any], str | None]:
    return lambda pipe: _hook_missing(method) or _block_reason(method, _denoiser(pipe))


def _hook(
    apply_name: str,
    config_class: str,
    context: bool = True,
    swap_cfg: bool = False,
    extra: dict[str, Any] | None = None,
) -> Callable[[Any, dict[str, Any]], _Peer]:
    """A diffusers hook built from the configuration as ``config_class``'s keyword arguments (plus
    ``extra`` ones that are code, not data). A configuration with a ``calibration`` is MagCache's:
    its ratios are fitted on attach. ``swap_cfg``: the hook assumes the CFG batch is [uncond,
    cond], so a pipeline that batches [cond, uncond] gets its halves swapped around the call."""

    def build(pipe: Any, config: dict[str, Any]) -> _Peer:
        import diffusers.hooks as dh

        def make(tracker: _StepTracker, ratios: list[float] | None) -> Any:
            return getattr(dh, config_class)(**_as_arguments(config, tracker, ratios), **(extra or {}))

        uncond_last = getattr(pipe, "stepcache_cfg_layout", "uncond_first") == "uncond_last"
        return _DiffusersPeer(
            apply_name,
            make,
            context=context,
            swap_cfg=swap_cfg and uncond_last,
            mag_calibration=config.get("calibration"),
        )

    return build


def _as_arguments(config: dict[str, Any], tracker: _StepTracker, ratios: list[float] | None) -> dict:
    """JSON configuration -> the config class's arguments: ranges as tuples, dtypes as torch's, and
    the callbacks only the runtime can give (timestep, fitted magnitude ratios)."""
    args: dict[str, Any] = {}
    for key, value in config.items():
        if key == "calibration":
            continue
        if key.endswith("_range") and isinstance(value, list):
            value = tuple(value)
        if key == "taylor_factors_dtype":
            value = getattr(torch, value)
        args[key] = value
    if "current_timestep_callback" in config:
        args["current_timestep_callback"] = tracker.current_timestep
    if ratios is not None:
        args["mag_ratios"] = ratios
    return args


def _taylor_targets(pipe: Any) -> dict[str, list[str]]:
    """TaylorSeer's ``cache_identifiers`` for this denoiser: every attention module (its default
    patterns miss diffusers' ``attn1``/``attn2`` and U-Net ``attentions.N`` names under
    ``re.fullmatch``), and, on a transformer, every block of each block list."""
    denoiser = _denoiser(pipe)
    targets = {}
    if any(re.fullmatch(_ATTENTION_NAMES, n) for n, _ in _attention_modules(denoiser)):
        targets["attention"] = [_ATTENTION_NAMES]
    lists = [n for n in _BLOCK_LISTS if isinstance(getattr(denoiser, n, None), torch.nn.ModuleList)]
    if _block_list(denoiser) is not None:
        targets["blocks"] = [rf"{n}\.\d+" for n in lists if len(getattr(denoiser, n)) > 0]
    return targets


def _taylor_documented(pipe: Any) -> dict[str, Any]:
    targets = _taylor_targets(pipe)
    return {
        "cache_interval": 5,
        "disable_cache_before_step": 3,
        "max_order": 1,
        "taylor_factors_dtype": "bfloat16",
        "cache_identifiers": targets.get("blocks", targets.get("attention")),
    }


def _taylor_space(pipe: Any) -> tuple[Knob, ...]:
    return (
        Knob("cache_interval", 2, 8, integer=True),
        Knob("disable_cache_before_step", 1, max(1, _steps(pipe) // 2), integer=True),
        Knob("max_order", 1, 2, integer=True),
        Knob("taylor_factors_dtype", choices=("float32", "bfloat16")),
        Knob("cache_identifiers", choices=tuple(_taylor_targets(pipe).values())),
    )


def _taylor_reason(pipe: Any) -> str | None:
    if not _taylor_targets(pipe):
        return f"TaylorSeerCache: {type(_denoiser(pipe)).__name__} has no attention module or block list"
    return None


def _taylor_sweep() -> tuple[dict[str, Any], ...]:
    fp32 = {"taylor_factors_dtype": "float32"}
    return ({}, *({"cache_interval": k, **fp32} for k in (2, 3, 4)))


def _pab_reason(pipe: Any) -> str | None:
    import diffusers.hooks as dh

    denoiser = _denoiser(pipe)
    ids = dh.PyramidAttentionBroadcastConfig.spatial_attention_block_identifiers
    spatial = [
        n
        for n, m in _attention_modules(denoiser)
        if any(re.search(i, n) for i in ids) and not getattr(m, "is_cross_attention", False)
    ]
    if not spatial:
        return f"PyramidAttentionBroadcast: no self-attention of {type(denoiser).__name__} matches {ids}"
    return None


def _faster_reason(pipe: Any) -> str | None:
    import inspect

    denoiser = _denoiser(pipe)
    if _block_list(denoiser) is not None:
        return None
    cls = type(denoiser).__name__
    # FasterCache's denoiser hook unpacks a tensor, a tuple or a Transformer2DModelOutput only
    returns = re.findall(r"\w*Output\b", str(inspect.signature(type(denoiser).forward).return_annotation))
    returns = [r for r in returns if r != "Transformer2DModelOutput"]
    unpack = (
        f"it returns {returns[0]}, which FasterCache's denoiser hook cannot unpack (it handles tensors, "
        "tuples and Transformer2DModelOutput; it fails with UnboundLocalError), and "
        if returns
        else ""
    )
    return (
        f"FasterCache: {cls} is not a transformer: {unpack}none of its attention layers match "
        "FasterCache's transformer-block identifiers"
    )


def _forward_params(pipe: Any) -> set[str]:
    """The keyword arguments the pipeline's denoiser's forward takes."""
    import inspect

    return set(inspect.signature(type(_denoiser(pipe)).forward).parameters)


def _faster_documented(pipe: Any) -> dict[str, Any]:
    import diffusers.hooks as dh

    # The CFG-split inputs: diffusers' list, plus what else the denoiser takes per batch row: the
    # class labels of a class-conditional DiT, SD3's pooled text embedding (left out, the skipped
    # unconditional half leaves it twice the batch of the other inputs).
    extra = ["class_labels"] + [k for k in ("pooled_projections",) if k in _forward_params(pipe)]
    cfg_kwargs = [*dh.FasterCacheConfig._unconditional_conditional_input_kwargs_identifiers, *extra]
    return {
        "spatial_attention_block_skip_range": 2,
        "spatial_attention_timestep_skip_range": [-1, 681],
        "unconditional_batch_skip_range": 5,
        "unconditional_batch_timestep_skip_range": [-1, 641],
        "tensor_format": "BCHW",
        "current_timestep_callback": "the pipeline's timestep",
        "_unconditional_conditional_input_kwargs_identifiers": cfg_kwargs,
    }


def _mag_documented(pipe: Any) -> dict[str, Any]:
    steps = _steps(pipe)
    return {
        "threshold": 0.06,
        "max_skip_steps": 3,
        "retention_ratio": 0.2,
        "num_inference_steps": steps,
        # MagCache's documented calibration: one calibrate=True run on this model
        "calibration": {"steps": steps, "guidance": _guidance(pipe), "samples": _MAG_CALIBRATION_SAMPLES},
    }


def _timestep_range(name: str, documented: list[int]) -> Knob:
    """A timestep window (the scheduler's 0..1000 scale): the documented one, and wider or
    shifted ones."""
    others = ([100, 800], [-1, 681], [-1, 1000], [200, 900], [-1, 500])
    return Knob(name, choices=(documented, *(o for o in others if o != documented)))


DIFFUSERS_METHODS = (
    # FirstBlockCache: skip blocks 2..n when the first block's residual barely changed.
    PeerMethod(
        "diffusers",
        "FirstBlockCache",
        documented=lambda pipe: {"threshold": 0.05},
        sweep=tuple({"threshold": t} for t in (0.05, 0.1, 0.2, 0.4)),
        space=lambda pipe: (Knob("threshold", 0.01, 1.0, log=True),),
        why_not=_block_hook_reason("FirstBlockCache"),
        build=_hook("apply_first_block_cache", "FirstBlockCacheConfig"),
        version=_diffusers_version,
    ),
    # MagCache: skip while the accumulated magnitude-ratio error, calibrated on this model, is small.
    PeerMethod(
        "diffusers",
        "MagCache",
        documented=_mag_documented,
        sweep=tuple({"threshold": t} for t in (0.06, 0.12, 0.24)),
        space=lambda pipe: (
            Knob("threshold", 0.01, 1.0, log=True),
            Knob("max_skip_steps", 1, 6, integer=True),
            Knob("retention_ratio", 0.0, 0.5),
        ),
        why_not=_block_hook_reason("MagCache"),
        build=_hook("apply_mag_cache", "MagCacheConfig"),
        version=_diffusers_version,
    ),
    # SeaCache: spectral indicator of the latents between steps.
    PeerMethod(
        "diffusers",
        "SeaCache",
        documented=lambda pipe: {
            "threshold": 0.25,
            "residual_order": 1,
            "retention_steps": 1,
            "cache_end_steps": 1,
            "max_consecutive_cached": 2,
        },
        sweep=tuple({"threshold": t} for t in (0.1, 0.25, 0.5, 1.0)),
        space=lambda pipe: (
            Knob("threshold", 0.02, 4.0, log=True),
            Knob("retention_steps", 1, 5, integer=True),
            Knob("max_consecutive_cached", 1, 5, integer=True),
        ),
        why_not=_block_hook_reason("SeaCache"),
        build=_hook("apply_sea_cache", "SeaCacheConfig", extra={"raw_vision_callback": _sea_raw_vision}),
        version=_diffusers_version,
    ),
    # TaylorSeer: module outputs forecast by a Taylor series between full steps; pointed at the
    # blocks through its documented cache_identifiers (its default patterns hook nothing here).
    PeerMethod(
        "diffusers",
        "TaylorSeerCache",
        documented=_taylor_documented,
        sweep=_taylor_sweep(),
        space=_taylor_space,
        why_not=lambda pipe: _hook_missing("TaylorSeerCache") or _taylor_reason(pipe),
        build=_hook("apply_taylorseer_cache", "TaylorSeerCacheConfig"),
        version=_diffusers_version,
    ),
    # Pyramid Attention Broadcast: reuse self-attention outputs within a timestep range.
    PeerMethod(
        "diffusers",
        "PyramidAttentionBroadcast",
        documented=lambda pipe: {
            "spatial_attention_block_skip_range": 2,
            "spatial_attention_timestep_skip_range": [100, 800],
            "current_timestep_callback": "the pipeline's timestep",
        },
        sweep=tuple({"spatial_attention_block_skip_range": k} for k in (2, 3, 4)),
        space=lambda pipe: (
            Knob("spatial_attention_block_skip_range", 2, 8, integer=True),
            _timestep_range("spatial_attention_timestep_skip_range", [100, 800]),
        ),
        why_not=lambda pipe: _hook_missing("PyramidAttentionBroadcast") or _pab_reason(pipe),
        build=_hook("apply_pyramid_attention_broadcast", "PyramidAttentionBroadcastConfig", context=False),
        version=_diffusers_version,
    ),
    # FasterCache: attention reuse plus the unconditional half approximated from the conditional.
    PeerMethod(
        "diffusers",
        "FasterCache",
        documented=_faster_documented,
        sweep=tuple({"spatial_attention_block_skip_range": k} for k in (2, 3, 4)),
        space=lambda pipe: (
            Knob("spatial_attention_block_skip_range", 2, 8, integer=True),
            _timestep_range("spatial_attention_timestep_skip_range", [-1, 681]),
            Knob("unconditional_batch_skip_range", 1, 8, integer=True),
            _timestep_range("unconditional_batch_timestep_skip_range", [-1, 641]),
        ),
        why_not=lambda pipe: _hook_missing("FasterCache") or _faster_reason(pipe),
        build=_hook("apply_faster_cache", "FasterCacheConfig", context=False, swap_cfg=True),
        version=_diffusers_version,
    ),
)


# ------------------------------------------------------------------------------------------ cache-dit


def _cache_dit_version() -> str | None:
    try:
        import cache_dit
    except Exception:
        return None
    return getattr(cache_dit, "__version__", None)


def _num_blocks(pipe: Any) -> int:
    blocks = _block_list(_denoiser(pipe))
    return len(blocks) if blocks is not None else 0


# denoiser -> the ForwardPattern found for it (a probe generation each time would cost a step)
_PATTERNS: weakref.WeakKeyDictionary[torch.nn.Module, str | None] = weakref.WeakKeyDictionary()


def _cache_dit_pattern(pipe: Any) -> str | None:
    """The ForwardPattern for cache-dit's BlockAdapter when it has no adapter of its own."""
    import cache_dit

    denoiser = _denoiser(pipe)
    blocks = _block_list(denoiser)
    if blocks is None or cache_dit.BlockAdapterRegister.is_supported(denoiser):
        return None
    if denoiser not in _PATTERNS:
        _PATTERNS[denoiser] = _forward_pattern(pipe, blocks)
    return _PATTERNS[denoiser]


def _cache_dit_context(pipe: Any) -> dict[str, Any]:
    pattern = _cache_dit_pattern(pipe)
    return {} if pattern is None else {"block_adapter": {"forward_pattern": pattern}}


def _cache_dit_describe(overrides: dict[str, Any]) -> str:
    """cache-dit's own short form: F1B0, the threshold, the calibrator."""
    out = ""
    if "Fn_compute_blocks" in overrides:
        out += f" F{overrides['Fn_compute_blocks']}B{overrides.get('Bn_compute_blocks', 0)}"
    if "residual_diff_threshold" in overrides:
        out += f" rdt={overrides['residual_diff_threshold']}"
    order = overrides.get("taylorseer_order", 0)
    return out + (f" +TaylorSeer{'' if order == 1 else order}" if order else "")


def _cache_dit_reason(pipe: Any) -> str | None:
    try:
        import cache_dit
    except Exception as e:  # ImportError, or a broken install
        why = "is not installed" if isinstance(e, ImportError) else f"failed to import ({e})"
        return f"cache-dit {why}; install it with {PEERS_INSTALL}"
    denoiser = _denoiser(pipe)
    blocks = _block_list(denoiser)
    supported = blocks is not None and cache_dit.BlockAdapterRegister.is_supported(denoiser)
    if supported or (blocks is not None and _cache_dit_pattern(pipe) is not None):
        return None
    return (
        f"cache-dit: {type(denoiser).__name__} is not a transformer with a block list cache-dit "
        f"{_cache_dit_version()} has an adapter for (DBCache caches the middle of a stack of same-shape "
        "transformer blocks; a U-Net's down/mid/up blocks change resolution and pass skip connections)"
    )


def _cache_dit_documented(pipe: Any) -> dict[str, Any]:
    # cache-dit's default is F8B0 for 20-60 block models; on a handful of blocks that computes
    # everything, so it is scaled to one leading block (its documented fastest "F1B0").
    return {
        "Fn_compute_blocks": 1,
        "Bn_compute_blocks": 0,
        "residual_diff_threshold": 0.08,
        "max_warmup_steps": 8,
        "max_cached_steps": -1,
        "max_continuous_cached_steps": -1,
        "enable_separate_cfg": False,  # our pipelines run CFG as one batch
        "taylorseer_order": 0,
    }


def _cache_dit_space(pipe: Any) -> tuple[Knob, ...]:
    n = max(2, _num_blocks(pipe))
    return (
        Knob("Fn_compute_blocks", 1, n - 1, integer=True),
        Knob("Bn_compute_blocks", 0, max(0, n - 2), integer=True),
        Knob("residual_diff_threshold", 0.02, 1.0, log=True),
        Knob("max_warmup_steps", 1, max(1, _steps(pipe) // 2), integer=True),
        Knob("max_continuous_cached_steps", choices=(-1, 1, 2, 3, 5)),
        Knob("taylorseer_order", 0, 2, integer=True),
    )


def _cache_dit_build(pipe: Any, config: dict[str, Any]) -> _Peer:
    n = _num_blocks(pipe)
    if n and config["Fn_compute_blocks"] + config["Bn_compute_blocks"] >= n:
        raise ValueError(
            f"cache-dit: Fn_compute_blocks + Bn_compute_blocks must leave a middle block to cache "
            f"({config['Fn_compute_blocks']} + {config['Bn_compute_blocks']} of {n} blocks)"
        )
    return _CacheDitPeer(config, pattern=_cache_dit_pattern(pipe))


CACHE_DIT_METHODS = (
    PeerMethod(
        "cache-dit",
        "DBCache",
        documented=_cache_dit_documented,
        sweep=tuple(
            {
                "Fn_compute_blocks": fn,
                "Bn_compute_blocks": bn,
                "residual_diff_threshold": rdt,
                "taylorseer_order": ts,
            }
            for fn, bn in ((1, 0), (1, 1), (2, 0))
            for rdt in (0.08, 0.12, 0.24)
            for ts in (0, 1)
        ),
        space=_cache_dit_space,
        why_not=_cache_dit_reason,
        build=_cache_dit_build,
        version=_cache_dit_version,
        describe=_cache_dit_describe,
        context=_cache_dit_context,
    ),
)

METHODS: tuple[PeerMethod, ...] = DIFFUSERS_METHODS + CACHE_DIT_METHODS
