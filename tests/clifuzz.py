"""A fuzzer for the command line: random argument vectors and hostile files for every command.

Each case runs ``stepcache`` in-process on a fresh sandbox folder and checks what a careless or
hostile user is promised (docs/guarantees.md):

- no traceback: the command exits 0, or fails with a usage error (exit 2) or a handled exit;
- no hang: every case finishes within a time limit (a FIFO or ``/dev/zero`` must not block);
- nothing half-written: a failing command leaves no new file and every existing file unchanged;
- no NaN in what a successful command writes.

Two modes. ``stub`` replaces the expensive work (loading a zoo model, training) by a sentinel:
every check that happens before the work runs for real, and a case that reaches the work counts
as accepted. ``real`` draws sizes small enough to run (digits-dit, a few steps and seeds) and
runs the whole command (every command but ``compare``, whose sweep takes minutes even then).
``tests/test_cli_fuzz.py`` runs a few hundred cases; ``benchmarks/fuzz.py --cli N`` many more.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from stepcache import presets, zoo

TIMEOUT_S = 120
MODELS = [*zoo.names(), "nope", "", "../digits-dit"]
BIG_INT = "9" * 5000


class ReachedWork(Exception):  # noqa: N818 - a sentinel, not an error
    """Raised in place of loading a model or training: every check before the work passed."""


class Hang(Exception):  # noqa: N818
    pass


# ---- value pools ------------------------------------------------------------------------------
INTS = [
    "0",
    "1",
    "2",
    "3",
    "-1",
    "16",
    "4096",
    "10001",
    "2147483648",
    "9223372036854775808",
    "99999999999999999999",
    BIG_INT,
    "1e23",
    "1.5",
    "abc",
    "",
    "inf",
    "nan",
    " 4",
    "0x10",
]
FLOATS = [
    "0",
    "1",
    "3",
    "7.5",
    "-1",
    "1e308",
    "1e400",
    "inf",
    "-inf",
    "nan",
    "1e-300",
    "abc",
    "",
    "3" * 400,
    "2.0",
]
# values that must be refused before any work, so a real run can draw them without running long
HOSTILE_INTS = ["-1", "0", "99999999999999999999", BIG_INT, "1e23", "1.5", "abc", "", "nan", "0x10"]
HOSTILE_FLOATS = ["-1", "1e308", "1e400", "inf", "-inf", "nan", "abc", "", "3" * 400]
SMALL_INTS = ["2", "3", "4", *HOSTILE_INTS]
PARAMS = [
    "interval=3",
    "interval=0",
    "interval=2.5",
    f"interval={BIG_INT}",
    "order=9",
    "threshold=nan",
    "threshold=1e400",
    "threshold=" + "1" * 400,
    "x",
    "=3",
    "interval=",
    "unknown=1",
    "warmup=[1,2]",
    'interval="3"',
    "threshold=0.1",
    "interval=\udcff",
]
NAMES = [
    "ok",
    "$x^2$",
    "reference",
    "__reference__",
    "a\udcffb",
    "<script>alert(1)</script>",
    "x" * 5000,
    "",
    "tab\there",
    "new\nline",
    "\\",
    "%s%n",
    "ünïcode ✓",
]
PEERS = ["cache-dit,diffusers", "", "nope", ",,,", "diffusers", "cache-dit"]
SEARCHERS = ["tpe", "nsga2", "cmaes", "random", "planner", "evolution", "anneal", "ecad", "bogus", ""]


# ---- hostile files, made once per run ---------------------------------------------------------
class Files:
    """Input files of every kind: valid, broken, hostile. Built once in ``root`` and reused."""

    def __init__(self, root: Path, result_dir: Path | None = None):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        good = presets.get("static-interval").to_dict()
        self.policies: list[str] = [str(presets.get("static-interval").save(root / "good.json"))]
        for i, name in enumerate(NAMES):
            doc = {**good, "name": name}
            self.policies.append(self._write(f"name{i}.json", json.dumps(doc).encode()))
        docs = {
            "bigint.json": json.dumps(good).replace('"interval": 2', '"interval": ' + "9" * 400),
            "bigfloat.json": json.dumps(presets.get("fbcache").to_dict()).replace(
                '"threshold": 0.1', '"threshold": ' + "1" * 400
            ),
            "nan.json": json.dumps(good)[:-1] + ', "meta": {"steps": NaN}}',
            "deep.json": json.dumps({**good, "meta": {"notes": "x"}})[:-2]
            + ', "target": '
            + '{"a": ' * 5000
            + "1"
            + "}" * 5002,
            "broken.json": '{"schema": "stepcache.policy/1", "rules": {',
            "empty.json": "",
            "list.json": "[]",
            "meta.json": json.dumps({**good, "meta": {"model": "<script>x</script>", "steps": 10**400}}),
        }
        for name, text in docs.items():
            self.policies.append(self._write(name, text.encode("utf-8", "surrogatepass")))
        self.policies.append(
            self._write("garbage.json", bytes(random.Random(0).randrange(256) for _ in range(999)))
        )
        self.policies.append(self._write("pickle.json", pickle.dumps({"schema": 1})))
        self.policies.append(self._write("latin1.json", '{"name": "\xe9"}'.encode("latin-1")))
        big = root / "huge.json"
        with open(big, "wb") as f:  # larger than any cap a reader should have for a policy
            f.write(b'{"x": "' + b"a" * (64 << 20) + b'"}')
        self.policies.append(str(big))
        fifo = root / "fifo"
        os.mkfifo(fifo)
        (root / "dir.json").mkdir()
        os.symlink("/dev/zero", root / "zero-link.json")
        os.symlink(root / "loop-a", root / "loop-b")
        os.symlink(root / "loop-b", root / "loop-a")
        self.specials = [
            str(fifo),
            "/dev/zero",
            "/dev/null",
            "/dev/full",
            str(root / "dir.json"),
            str(root / "missing.json"),
            str(root / "zero-link.json"),
            str(root / "loop-a"),
            "",
        ]
        self.policies += self.specials
        self.init_dirs = self._init_dirs()
        self.result_dir = result_dir

    def _write(self, name: str, data: bytes) -> str:
        path = self.root / name
        path.write_bytes(data)
        return str(path)

    def _init_dirs(self) -> list[str]:
        import torch

        out = []
        for name, weights, config in [
            ("pickle", pickle.dumps({"w": 1}), b"{}"),
            ("torchsave", None, b"{}"),
            ("config-list", b"", b"[]"),
            ("garbage", os.urandom(256), b'{"model": 1}'),
        ]:
            d = self.root / "init" / name
            d.mkdir(parents=True)
            if weights is None:
                torch.save({"w": torch.zeros(2)}, d / "model.safetensors")
            else:
                (d / "model.safetensors").write_bytes(weights)
            (d / "config.json").write_bytes(config)
            out.append(str(d))
        (self.root / "init" / "empty").mkdir()
        return [*out, str(self.root / "init" / "empty"), "shipped", str(self.root / "fifo"), "/dev/zero"]


# ---- result folders for `report` --------------------------------------------------------------
JUNK: list[Any] = [
    None,
    "<script>alert(1)</script>",
    -1,
    10**400,
    1e308,
    [],
    {},
    [[[]]],
    True,
    "x" * 100_000,
    "$\\frac{1}{0}$",
    {"a": {"b": {"c": {"d": {}}}}},
]


def _mutate_result(rng: random.Random, src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
    doc = json.loads((src / "result.json").read_text())
    what = rng.randrange(9)
    if what == 0:
        (dst / "result.json").write_bytes(os.urandom(rng.randrange(1, 2000)))
    elif what == 1:
        (dst / "samples.safetensors").write_bytes(os.urandom(rng.randrange(1, 2000)))
    elif what == 2:
        (dst / "result.json").unlink()
        (dst / "result.json").mkdir()
    elif what == 3:
        (dst / "report.html").unlink(missing_ok=True)
        (dst / "report.html").mkdir()
    elif what == 4:
        (dst / "samples.safetensors").unlink()
        os.mkfifo(dst / "samples.safetensors")
    else:  # one field of the document replaced by junk, at the top, in the protocol or in a run
        target: Any = doc
        path: list[Any] = []
        while isinstance(target, (dict, list)) and target and rng.random() < 0.7:
            key = rng.choice(list(target)) if isinstance(target, dict) else rng.randrange(len(target))
            path.append(key)
            if not isinstance(target[key], (dict, list)) or rng.random() < 0.3:
                break
            target = target[key]
        if path:
            parent = doc
            for key in path[:-1]:
                parent = parent[key]
            if rng.random() < 0.1 and isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent[path[-1]] = rng.choice(JUNK)
        text = json.dumps(doc, allow_nan=True)
        if rng.random() < 0.1:
            text = text.replace("1", "NaN", 1)
        (dst / "result.json").write_text(text)


SMALL_DEFAULTS = {
    "demo": ["--samples", "2", "--steps", "4", "--repeats", "1", "--model", "digits-dit"],
    "calibrate": ["--samples", "2", "--steps", "4", "--model", "digits-dit"],
    "bench": ["--seeds", "2", "--steps", "4", "--repeats", "1"],
    "compare": ["--seeds", "2", "--steps", "4", "--repeats", "1", "--peers", ""],
    "search": ["--calib-seeds", "2", "--heldout-seeds", "2", "--steps", "4", "--budget", "2"],
    "zoo train": ["--steps", "2", "--limit-images", "8"],
}


# ---- argument vectors --------------------------------------------------------------------------
@dataclass
class Case:
    argv: list[str]
    box: Path
    watched: dict[str, str] = field(default_factory=dict)  # existing files that must not change


def _out_path(rng: random.Random, box: Path, kind: str, small: bool = False) -> str:
    existing = box / "existing.txt"
    existing.write_text("keep me\n")
    folder = box / "folder"
    folder.mkdir(exist_ok=True)
    (folder / "inside.txt").write_text("keep me too\n")
    choices = [
        str(box / "out"),
        str(box / "out" / "deeper"),
        str(existing),
        str(folder),
        str(existing / "x"),
        "/dev/full",
        "/proc/stepcache-fuzz/x",
        str(box / "fifo-out"),
    ]
    if kind == "file":
        choices += [str(box / "policy.json"), str(box / "out.json")]
    if rng.random() < 0.1:
        os.mkfifo(box / "fifo-out")
    if small and rng.random() < 0.8:
        return str(box / ("out" if kind == "dir" else "out.json"))
    return rng.choice(choices)


def _opts(rng: random.Random, spec: dict[str, list[str] | None], plausible: float = 0.5) -> list[str]:
    """Each option with probability 0.4; its value, with probability ``plausible``, one a careful
    user might give (pools start with those; hostile values are never plausible), so the checks
    after the first bad value run too."""
    hostile = set(HOSTILE_INTS) | set(HOSTILE_FLOATS)
    argv: list[str] = []
    for name, pool in spec.items():
        if rng.random() < 0.4:
            if pool is None:
                argv.append(name)
                continue
            careful = [v for v in pool[:4] if v not in hostile] or pool
            argv += [name, rng.choice(careful if rng.random() < plausible else pool)]
    if rng.random() < 0.05:
        argv.append(rng.choice(["--nope", "-x", "--", "--steps"]))
    return argv


def make_case(rng: random.Random, files: Files, box: Path, small: bool = False) -> Case:
    """A random command line over ``files``, writing under ``box``."""
    ints = SMALL_INTS if small else INTS
    floats = FLOATS
    models = ["digits-dit"] if small else MODELS
    opts = functools.partial(_opts, plausible=0.9 if small else 0.5)
    pols = files.policies
    preset_names = [*presets.names(), "nope", "", "$x$"]
    commands = ["demo", "calibrate", "bench", "compare", "search", "report", "zoo", "presets"]
    if small:  # compare's sweep takes minutes even at small sizes; its checks are bench's and run stubbed
        commands.remove("compare")
    command = rng.choice(commands)
    if command == "demo":
        argv = [
            "demo",
            *opts(
                rng,
                {
                    "--model": models,
                    "--preset": preset_names,
                    "--policy": pols,
                    "-p": PARAMS,
                    "--steps": ints,
                    "--guidance": floats,
                    "--samples": ["1", "2", *HOSTILE_INTS] if small else INTS,
                    "--repeats": ["1", *HOSTILE_INTS] if small else INTS,
                    "--seed": ["0", "7", *HOSTILE_INTS] if small else INTS,
                },
            ),
            "--out",
            _out_path(rng, box, "dir", small),
        ]
    elif command == "calibrate":
        method = rng.choice(["linear-ag", "magcache", "teacache", "nope", "fbcache"])
        argv = [
            "calibrate",
            method,
            *opts(
                rng,
                {
                    "--model": models,
                    "--steps": ints,
                    "--guidance": floats,
                    "--samples": ["1", "2", *HOSTILE_INTS] if small else INTS,
                    "-p": PARAMS,
                },
            ),
            "--out",
            _out_path(rng, box, "file", small),
        ]
    elif command in ("bench", "compare"):
        spec: dict[str, list[str] | None] = {
            "--steps": ints,
            "--seeds": ["1", "2", *HOSTILE_INTS] if small else INTS,
            "--repeats": ["1", *HOSTILE_INTS] if small else INTS,
            "--guidance": floats,
            "--policy": pols,
        }
        if command == "bench":
            spec["--preset"] = preset_names
        else:
            spec["--peers"] = [""] if small else PEERS
        argv = [command, rng.choice(models), *opts(rng, spec), "--out", _out_path(rng, box, "dir", small)]
    elif command == "search":
        spec = {
            "--speedup": ["1.5", "2", *HOSTILE_FLOATS] if small else FLOATS,
            "--min-psnr": floats,
            "--budget": ["1.5", "2", *HOSTILE_FLOATS] if small else FLOATS,
            "--searcher": ["planner", "random", "bogus"] if small else SEARCHERS,
            "--storage": [f"sqlite:///{box}/s.db", "sqlite:////proc/nope/s.db", "bogus://x", ""],
            "--study": ["s", "", "a/b", "x" * 300],
            "--calib-seeds": ["1", "2", *HOSTILE_INTS] if small else INTS,
            "--heldout-seeds": ["1", "2", *HOSTILE_INTS] if small else INTS,
            "--steps": ints,
            "--guidance": floats,
            "--seed": ["0", *HOSTILE_INTS] if small else INTS,
            "--engine": ["local", "bogus"] if small else ["local", "ray", "bogus"],
            "--workers": INTS,
            "--blocks": None,
            "--report": [str(box / "rep"), str(box / "existing.txt")],
        }
        argv = ["search", rng.choice(models), *opts(rng, spec), "--out", _out_path(rng, box, "file", small)]
    elif command == "report":
        target = box / "res"
        if files.result_dir is not None and rng.random() < 0.9:
            _mutate_result(rng, files.result_dir, target)
        else:
            target = Path(rng.choice([str(box), "/dev/null", str(box / "missing"), str(files.root / "fifo")]))
        argv = ["report", str(target)]
        if rng.random() < 0.5:
            argv += ["--figure", _out_path(rng, box, "file", small)]
    elif command == "zoo":
        sub = rng.choice(["list", "info", "train"])
        if sub == "train":
            argv = [
                "zoo",
                "train",
                rng.choice(models),
                *opts(
                    rng,
                    {
                        "--steps": ["1", *HOSTILE_INTS] if small else INTS,
                        "--limit-images": ["8", *HOSTILE_INTS] if small else INTS,
                        "--lr": floats,
                        "--init-from": files.init_dirs,
                        "--no-resume": None,
                    },
                ),
                "--out",
                _out_path(rng, box, "dir", small),
            ]
        else:
            argv = ["zoo", sub] + ([rng.choice(MODELS)] if sub == "info" else [])
    else:
        argv = ["presets"]
    if small and (argv[0] in SMALL_DEFAULTS or argv[:2] == ["zoo", "train"]):
        # sizes the defaults would make long, set small first; a drawn value later overrides them
        extra = SMALL_DEFAULTS["zoo train" if argv[0] == "zoo" else argv[0]]
        at = 3 if argv[0] == "zoo" else (1 if argv[0] in ("demo",) else 2)
        argv = [*argv[:at], *extra, *argv[at:]]
    return Case(argv, box)


# ---- running and checking ---------------------------------------------------------------------
def _snapshot(box: Path) -> dict[str, str]:
    """Every entry under ``box``: its kind and, for regular files, a hash of its bytes."""
    out = {}
    for root, dirs, names in os.walk(box):
        for name in dirs + names:
            p = Path(root) / name
            mode = os.lstat(p).st_mode
            if stat.S_ISREG(mode):
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p)] = "dir" if stat.S_ISDIR(mode) else "special"
    return out


def _no_constant(name: str) -> float:
    # A PSNR of an image identical to its reference is +Infinity by the result schema; NaN is
    # never a result.
    if name == "NaN":
        raise ValueError("NaN in a JSON output")
    return float(name)


@contextlib.contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    def on_alarm(*_: Any) -> None:
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def stubbed_work() -> Iterator[None]:
    """Loading a zoo model or training raises ReachedWork instead of doing the work."""
    import stepcache.zoo.train as train_mod

    def reached(*_: Any, **__: Any) -> Any:
        raise ReachedWork

    saved = zoo.load, train_mod.train
    zoo.load, train_mod.train = reached, reached
    try:
        yield
    finally:
        zoo.load, train_mod.train = saved


@dataclass
class Outcome:
    argv: list[str]
    exit_code: int | None
    verdict: str  # "ok" | "usage-error" | "reached-work" | a failure kind
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.verdict not in ("ok", "usage-error", "handled-exit", "reached-work")


def run_case(case: Case, timeout: int = TIMEOUT_S) -> Outcome:
    from stepcache.cli import app

    before = _snapshot(case.box)
    try:
        with _time_limit(timeout):
            result = CliRunner().invoke(app, case.argv, catch_exceptions=True)
    except Hang as e:
        return Outcome(case.argv, None, "hang", str(e))
    exc = result.exception
    if isinstance(exc, ReachedWork):
        return Outcome(case.argv, result.exit_code, "reached-work")
    if isinstance(exc, Hang):
        return Outcome(case.argv, None, "hang", str(exc))
    if exc is not None and not isinstance(exc, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-4))
        return Outcome(case.argv, result.exit_code, "traceback", tb[-3000:])
    after = _snapshot(case.box)
    if result.exit_code == 0:
        for p, h in after.items():  # what a success writes is strict JSON (no NaN, no Infinity)
            written = p.endswith(".json") and before.get(p) != h and h not in ("dir", "special")
            if written and not Path(p).read_bytes().startswith(b"\x89PNG"):  # `--figure x.json` is a PNG
                try:
                    json.loads(Path(p).read_text(encoding="utf-8"), parse_constant=_no_constant)
                except ValueError as e:
                    return Outcome(case.argv, 0, "bad-json-written", f"{p}: {e}")
        return Outcome(case.argv, 0, "ok")
    changed = sorted(p for p, h in before.items() if after.get(p) != h)
    created = sorted(p for p, h in after.items() if p not in before and h != "dir")
    if changed or created:
        return Outcome(
            case.argv, result.exit_code, "wrote-on-failure", f"changed {changed} created {created}"
        )
    if result.exit_code == 2:
        if "Error" not in result.output and "error" not in result.output:
            return Outcome(case.argv, 2, "silent-usage-error", result.output[-500:])
        return Outcome(case.argv, 2, "usage-error")
    return Outcome(case.argv, result.exit_code, "handled-exit", result.output[-300:])


def make_result_dir(root: Path) -> Path:
    """A real, valid bench folder (tiny) for the report cases to mutate."""
    from stepcache.cli import app

    out = root / "valid-result"
    args = [
        "bench",
        "digits-dit",
        "--preset",
        "static-interval",
        "--seeds",
        "2",
        "--repeats",
        "1",
        "--steps",
        "4",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(app, args)
    if result.exit_code != 0:
        raise RuntimeError(f"could not build the report fixture: {result.output}")
    return out


def fuzz(
    n: int, seed: int = 0, small: bool = False, files: Files | None = None, progress: Any = None
) -> dict[str, Any]:
    """Run ``n`` cases; returns counts per verdict and the first few failures."""
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    failures: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="stepcache-fuzz-") as tmp:
        tmp_path = Path(tmp)
        if files is None:
            files = Files(tmp_path / "files", make_result_dir(tmp_path))
        guard = contextlib.nullcontext() if small else stubbed_work()
        with guard:
            for i in range(n):
                box = tmp_path / f"case{i}"
                box.mkdir()
                case = make_case(rng, files, box, small=small)
                outcome = run_case(case)
                counts[outcome.verdict] = counts.get(outcome.verdict, 0) + 1
                if outcome.failed and len(failures) < 20:
                    failures.append(
                        {"argv": outcome.argv, "verdict": outcome.verdict, "detail": outcome.detail}
                    )
                shutil.rmtree(box, ignore_errors=True)
                if progress is not None:
                    progress(i + 1, n, counts)
    return {
        "cases": n,
        "seed": seed,
        "mode": "real" if small else "stub",
        "verdicts": counts,
        "failures": sum(
            v for k, v in counts.items() if k not in ("ok", "usage-error", "handled-exit", "reached-work")
        ),
        "first_failures": failures,
    }
