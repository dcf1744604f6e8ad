"""Search storages: data that never runs code, resumes that reach the uninterrupted result at every
kill point, and one search at a time per study."""

from __future__ import annotations

import json
import pickle
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from stepcache.cli import app
from stepcache.search import SearchError, search
from stepcache.search import storage as st
from stepcache.search.evaluate import CostModel, Evaluator

optuna = pytest.importorskip("optuna")

# A fixed cost model: which candidates meet the target must not depend on this machine's timing.
FIXED = CostModel(full=6.0, save_estimated=0.9, save_cond_only=0.45)
TINY = {"speedup": 2.0, "budget": 4.5, "calib_seeds": 2, "heldout_seeds": 1, "steps": 6, "oracle": False}


class _Opens:
    """Unpickling this opens (creates) ``path``: what a crafted storage could make a loader do."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


def _crafted_storage(db: Path, marker: Path) -> None:
    """A study whose finished trial carries a CMA-ES optimizer attribute that runs code when loaded."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    study = optuna.create_study(storage=storage, study_name="evil", direction="maximize")
    dists = {
        "order": optuna.distributions.IntDistribution(0, 2),
        "computed": optuna.distributions.IntDistribution(1, 3),
    }
    payload = pickle.dumps(_Opens(marker)).hex()
    study.add_trial(
        optuna.trial.create_trial(
            params={"order": 0, "computed": 2},
            distributions=dists,
            value=1.0,
            system_attrs={"cma:optimizer:0": payload, "cma:generation": 0},
        )
    )


def test_cmaes_refuses_a_storage_and_never_loads_its_pickles(tmp_path: Path) -> None:
    db, marker, out = tmp_path / "evil.db", tmp_path / "pwned", tmp_path / "p.json"
    _crafted_storage(db, marker)
    args = ["search", "digits-dit", "--speedup", "2", "--budget", "3", "--steps", "6", "--out", str(out)]
    res = CliRunner().invoke(
        app, [*args, "--searcher", "cmaes", "--storage", f"sqlite:///{db}", "--study", "evil"]
    )
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "storage" in text and "cmaes" in text and "pickles" in text
    assert not marker.exists() and not out.exists()


def test_cmaes_refuses_a_study_name_and_runs_in_memory_without_one(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(SearchError, match="study: --searcher cmaes keeps pickles"):
        search("digits-dit", searcher="cmaes", study="x", **TINY)
    monkeypatch.setattr(CostModel, "calibrate", classmethod(lambda cls, ev, blocks=False: FIXED))
    out = tmp_path / "p.json"
    args = ["search", "digits-dit", "--speedup", "2", "--budget", "2.5", "--steps", "6", "--out", str(out)]
    small = ["--calib-seeds", "2", "--heldout-seeds", "1", "--searcher", "cmaes"]
    res = CliRunner().invoke(app, [*args, *small])
    assert res.exit_code == 0, res.output
    assert out.exists() and not list(tmp_path.glob("*.db"))  # no storage, so nothing to resume from


def test_cmaes_without_its_package_says_how_to_install_it(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "cmaes", None)  # import cmaes now raises ImportError
    with pytest.raises(SearchError, match="pip install cmaes"):
        search("digits-dit", searcher="cmaes", **TINY)


@pytest.mark.parametrize("budget", [1e308, 10_001.0, 10**400])
def test_an_absurd_budget_is_refused_before_any_model_loads(budget: float, monkeypatch) -> None:
    monkeypatch.setattr("stepcache.zoo.load", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SearchError, match="budget: at most 10000"):
        search("digits-dit", **{**TINY, "budget": budget})


# Resume at every kill point: the study reaches the policy the uninterrupted search reaches.


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the search catches it."""


def _kill_at(cls: Any, name: str, call: int, *, after: bool = False, key: str | None = None) -> Callable:
    """``cls.name`` that raises Killed at its ``call``-th call (with ``key`` as first argument, when
    given), before it runs or, with ``after``, once it has."""
    original, calls = getattr(cls, name), [0]

    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if key is not None and (args[0] if args else kwargs.get("key")) != key:
            return original(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == call and not after:
            raise Killed
        out = original(self, *args, **kwargs)
        if calls[0] == call:
            raise Killed
        return out

    return wrapper


KILL_POINTS = {
    "study created, nothing stored": (optuna.study.Study, "set_user_attr", 1, False, None),
    "cost model stored, not the settings": (optuna.study.Study, "set_user_attr", 1, False, "config"),
    "a planner seed queued, not started": (optuna.study.Study, "enqueue_trial", 2, True, None),
    "a planner seed running": (Evaluator, "evaluate", 1, False, None),
    "a proposal running": (Evaluator, "evaluate", 4, False, None),
    "a proposal asked, not yet recorded": (optuna.study.Study, "ask", 6, True, None),
    "a point stored, the trial not closed": (optuna.trial.Trial, "set_user_attr", 3, True, "point"),
    # the 6th ask, before it: random search asks 9 times in all at TINY's budget, TPE 15
    "some trials completed": (optuna.study.Study, "ask", 6, False, None),
    # TINY's search evaluates 6 candidates, then 3 in the polish (not trials: it runs again on resume)
    "a polish move running": (Evaluator, "evaluate", 8, False, None),
}


def _outcome(pol: Any) -> tuple:
    meta = pol.meta
    return pol.to_dict()["rules"], meta["calibration"], meta["budget_used"], meta["search"]["evaluated"]


@pytest.fixture(scope="module")
def fixed_cost() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CostModel, "calibrate", classmethod(lambda cls, ev, blocks=False: FIXED))
        yield


@pytest.fixture(scope="module")
def uninterrupted(fixed_cost: None) -> Callable[[str], tuple]:
    results: dict[str, tuple] = {}

    def get(searcher: str) -> tuple:
        if searcher not in results:  # in memory: the storage must make no difference
            results[searcher] = _outcome(search("digits-dit", searcher=searcher, **TINY))
        return results[searcher]

    return get


@pytest.fixture
def shared_storage(tmp_path: Path, monkeypatch) -> Callable[[str], tuple[str, Callable[[], int]]]:
    """A storage URL that outlives a killed search, and a count of its trials left open. Most kill
    points run on an in-memory storage shared by both searches (SQLite costs seconds per search on
    a busy machine); a few on SQLite, where what is stored goes through JSON."""
    from optuna.trial import TrialState

    def make(kind: str) -> tuple[str, Callable[[], int]]:
        if kind == "sqlite":
            db = tmp_path / "s.db"

            def open_in_file() -> int:
                with sqlite3.connect(db) as con:
                    return con.execute(
                        "select count(*) from trials where state in ('RUNNING', 'WAITING')"
                    ).fetchone()[0]

            return f"sqlite:///{db}", open_in_file
        shared = optuna.storages.InMemoryStorage()
        monkeypatch.setattr(st, "open_storage", lambda url: shared)

        def open_in_memory() -> int:
            (study,) = shared.get_all_studies()
            states = (TrialState.RUNNING, TrialState.WAITING)
            return len(shared.get_all_trials(study._study_id, states=states))

        return "memory://", open_in_memory

    return make


@pytest.mark.parametrize(
    ("searcher", "point", "kind"),
    [("tpe", p, "memory") for p in KILL_POINTS]
    + [("tpe", "a proposal running", "sqlite"), ("tpe", "a planner seed queued, not started", "sqlite")]
    + [("nsga2", "a proposal running", "memory"), ("random", "some trials completed", "memory")],
)
def test_a_killed_search_resumes_to_the_uninterrupted_result(
    searcher: str, point: str, kind: str, uninterrupted: Callable, shared_storage: Callable, monkeypatch
) -> None:
    expected = uninterrupted(searcher)
    url, open_trials = shared_storage(kind)
    run = {"searcher": searcher, "storage": url, "study": "s", **TINY}
    cls, name, call, after, key = KILL_POINTS[point]
    with monkeypatch.context() as mp:
        mp.setattr(cls, name, _kill_at(cls, name, call, after=after, key=key))
        with pytest.raises(Killed):
            search("digits-dit", **run)
    resumed = search("digits-dit", **run)
    assert _outcome(resumed) == expected
    assert open_trials() == 0


def test_a_tampered_point_is_refused_naming_the_trial(fixed_cost: None, tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    run = {"searcher": "planner", "storage": f"sqlite:///{db}", "study": "s", **TINY}
    search("digits-dit", **run)
    with sqlite3.connect(db) as con:
        (value,) = con.execute("select value_json from trial_user_attributes where key = 'point'").fetchone()
        point = json.loads(value)
        point["candidate"]["computed"] = {"__reduce__": "os.system"}
        con.execute(
            "update trial_user_attributes set value_json = ? where key = 'point'", (json.dumps(point),)
        )
    with pytest.raises(SearchError, match=r"storage: trial \d+ of study 's' holds a malformed candidate"):
        search("digits-dit", **run)


# One search per study; a fresh storage created by two processes at once.

_RACER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import optuna
    from stepcache.search.storage import StudyLock, open_storage

    folder, who, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    for i in range(rounds):
        (folder / f"ready-{i}-{who}").touch()
        while not (folder / f"go-{i}").exists():
            time.sleep(0.001)
        store = open_storage(f"sqlite:///{folder / f'fresh-{i}.db'}")
        lock = StudyLock.acquire(store, f"study-{who}")
        optuna.create_study(storage=store, study_name=f"study-{who}", load_if_exists=True)
        lock.release()
        store.engine.dispose()
    """
)


def test_two_processes_create_a_fresh_storage_at_once(tmp_path: Path) -> None:
    rounds = 3
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(tmp_path), who, str(rounds)], stderr=subprocess.PIPE, text=True
        )
        for who in ("a", "b")
    ]
    for i in range(rounds):
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready-{i}-{w}").exists() for w in "ab"):
            assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        (tmp_path / f"go-{i}").touch()  # both start creating the same fresh database now
    for p in procs:
        assert p.wait(timeout=120) == 0, p.communicate()[1][-2000:]
    for i in range(rounds):
        names = optuna.get_all_study_names(f"sqlite:///{tmp_path / f'fresh-{i}.db'}")
        assert sorted(names) == ["study-a", "study-b"]  # both studies made it; their locks are gone


def test_a_second_search_on_a_held_study_is_refused(tmp_path: Path) -> None:
    url, out = f"sqlite:///{tmp_path / 's.db'}", tmp_path / "p.json"
    lock = st.StudyLock.acquire(st.open_storage(url), "held")
    try:
        args = [
            "search",
            "digits-dit",
            "--speedup",
            "2",
            "--out",
            str(out),
            "--storage",
            url,
            "--study",
            "held",
        ]
        res = CliRunner().invoke(app, args)
    finally:
        lock.release()
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "'held' is being searched by process" in text and "--study" in text
    assert not out.exists()
    st.StudyLock.acquire(st.open_storage(url), "held").release()  # released: free again


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    store = st.open_storage(f"sqlite:///{tmp_path / 's.db'}")
    dead = st.StudyLock.acquire(store, "s")
    dead._stop.set()  # the holder dies: no more heartbeats, and nobody deletes its lock
    dead._thread.join()
    store.set_study_user_attr(dead.study_id, "pid", _dead_pid())
    taker = st.StudyLock.acquire(store, "s")
    try:
        names = [s.study_name for s in store.get_all_studies()]
        assert names == ["s::lock::1"]  # the dead one's lock is gone, the new one is the next epoch
        with pytest.raises(SearchError, match="'s' is being searched by process"):
            st.StudyLock.acquire(store, "s")
    finally:
        taker.release()
    assert store.get_all_studies() == []


def test_a_lock_from_another_host_is_stale_only_without_heartbeats() -> None:
    now = time.time()
    owner = {"pid": 1, "host": "elsewhere.invalid", "since": "then", "heartbeat": now - 60}
    assert st.holder(owner, now) == "process 1 on elsewhere.invalid since then"
    assert st.holder({**owner, "heartbeat": now - st.STALE_AFTER_S - 1}, now) is None
    assert st.holder({"pid": "1; rm -rf /"}, now) is None  # malformed: nobody holds it
    here = {**owner, "host": socket.gethostname()}
    assert st.holder({**here, "pid": 0}, now) is None  # a process group, not a process


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="zombies are read from /proc")
def test_a_killed_holder_not_yet_waited_for_holds_nothing() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 60
    while Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    owner = {"pid": proc.pid, "host": socket.gethostname(), "heartbeat": time.time()}
    try:
        assert st.holder(owner) is None
    finally:
        proc.wait()


def test_storage_that_cannot_be_opened_is_named_without_its_password(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(SearchError, match="storage: cannot open sqlite:///"):
        st.open_storage(f"sqlite:///{junk}")
    with pytest.raises(SearchError, match=r"storage: cannot open .*\*\*\*") as info:
        st.open_storage("postgresql://user:secret@127.0.0.1:1/db")
    assert "secret" not in str(info.value)
