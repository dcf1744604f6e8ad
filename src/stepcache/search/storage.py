"""Opening an Optuna storage, and one search at a time per study.

A storage is data that anyone with write access to the file or database may have written: nothing
here (or in the samplers stepcache runs on a storage) unpickles or evaluates what it reads.

The lock is a companion study named ``<study>::lock::<epoch>``: the database's unique study name
makes creating it atomic, its user attributes name the holder (pid, host, start, heartbeat), and
the holder deletes it when done. A lock whose holder is gone (a dead pid on this host, or no
heartbeat for ``STALE_AFTER_S`` from anywhere) is replaced by the next epoch, never deleted and
recreated under the same name, so two processes that both find it stale cannot both win.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import random
import socket
import threading
import time
from pathlib import Path
from typing import Any

from ..policy import PolicyError
from .evaluate import CostModel, SearchError
from .space import CFG_MODES, DAMPINGS, EXPANSIONS, STRIDES, Candidate, Point

OPEN_ATTEMPTS = 8
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0  # generous: clocks of two hosts may disagree by a minute or two
OWNERLESS_WAIT_S = 5.0  # a lock is named a few milliseconds after it is created


def lock_prefix(study_name: str) -> str:
    return f"{study_name}::lock::"


def _shown(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not even a URL: the message says so without repeating it
        return "(unparsable URL)"


def open_storage(url: str) -> Any:
    """An ``RDBStorage`` for ``url``. Two processes creating the tables of a fresh database at once
    race on its version row; the loser finds the tables made and succeeds on a retry."""
    import optuna
    from optuna.storages import RDBStorage
    from sqlalchemy.exc import IntegrityError, OperationalError

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for attempt in range(OPEN_ATTEMPTS):
        try:
            return RDBStorage(url)
        except (IntegrityError, OperationalError) as e:
            if attempt == OPEN_ATTEMPTS - 1:
                raise SearchError(f"storage: cannot open {_shown(url)}: {_first_line(e)}") from None
            time.sleep(min(0.5, 0.02 * 2**attempt) * (1 + random.random()))  # ~2 s in all
        except Exception as e:  # a malformed URL, a file that is not a database, an old schema
            raise SearchError(f"storage: cannot open {_shown(url)}: {_first_line(e)}") from None
    raise AssertionError("unreachable")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill there terminates the process: only heartbeats tell
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, ValueError):
        return False
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """A killed process that its parent has not waited for yet keeps its pid but runs nothing."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def holder(owner: dict[str, Any], now: float | None = None) -> str | None:
    """Who holds a lock with these attributes, or None when its holder is gone."""
    now = time.time() if now is None else now
    pid, host, beat = owner.get("pid"), owner.get("host"), owner.get("heartbeat")
    well_formed = _is_int(pid) and pid > 0 and isinstance(host, str) and _is_real(beat)  # pid <= 0: a group
    if not well_formed or abs(now - beat) > STALE_AFTER_S:  # silent too long, or from a far-off clock
        return None
    if host == socket.gethostname() and not _alive(pid):
        return None
    return f"process {pid} on {printable(host)} since {printable(owner.get('since', '?'))}"


def printable(value: Any) -> str:
    """A stored string fit for a message: short, and without terminal control characters."""
    return "".join(c for c in str(value)[:64] if c.isprintable())


class StudyLock:
    """Held while one process searches a study; ``release`` (or a dead holder) frees it."""

    def __init__(self, storage: Any, study_name: str, study_id: int):
        self.storage, self.study_name, self.study_id = storage, study_name, study_id
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="stepcache-study-lock", daemon=True)

    @classmethod
    def acquire(cls, storage: Any, study_name: str) -> StudyLock:
        """Take the lock of ``study_name``, or raise SearchError naming who holds it."""
        from optuna.exceptions import DuplicatedStudyError
        from optuna.study import StudyDirection

        for _ in range(OPEN_ATTEMPTS):
            locks = _locks(storage, study_name)
            epoch = max(locks, default=-1)
            if epoch >= 0:
                who = _wait_for_owner(storage, locks[epoch])
                if who is not None:
                    raise SearchError(
                        f"study: {study_name!r} is being searched by {who}; "
                        "wait for it or pass another --study"
                    )
            try:
                sid = storage.create_new_study(
                    [StudyDirection.MINIMIZE], lock_prefix(study_name) + str(epoch + 1)
                )
            except DuplicatedStudyError:
                continue  # another process took this epoch first: look again
            lock = cls(storage, study_name, sid)
            lock._own()
            for older in locks.values():  # their holders are gone; ids below ours are never reused
                _delete(storage, older)
            lock._thread.start()
            return lock
        raise SearchError(f"study: {study_name!r} is being claimed by other processes; try again")

    def _own(self) -> None:
        since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        for key, value in (("pid", os.getpid()), ("host", socket.gethostname()), ("since", since)):
            self.storage.set_study_user_attr(self.study_id, key, value)
        self.storage.set_study_user_attr(self.study_id, "heartbeat", time.time())

    def _beat(self) -> None:
        try:
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    self.storage.set_study_user_attr(self.study_id, "heartbeat", time.time())
                except KeyError:  # deleted: another process judged this one gone and took over
                    self.lost = True
                    return
                except Exception:  # a busy database; the next beat tries again
                    continue
        finally:
            # SQLite connections belong to the thread that opened them (other storages have none)
            getattr(self.storage, "remove_session", lambda: None)()

    def check(self) -> None:
        if self.lost:
            raise SearchError(f"study: {self.study_name!r} was taken over by another process")

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.lost:
            return
        try:
            _delete(self.storage, self.study_id)
        except Exception:  # the database is gone: the lock goes stale with this process, and the
            pass  # search's own error (if any) is the one to report


def _locks(storage: Any, study_name: str) -> dict[int, int]:
    """Epoch -> study id of the lock studies of ``study_name``."""
    prefix = lock_prefix(study_name)
    out = {}
    for s in storage.get_all_studies():
        tail = s.study_name[len(prefix) :] if s.study_name.startswith(prefix) else ""
        if tail.isdigit():
            out[int(tail)] = s._study_id
    return out


def _wait_for_owner(storage: Any, study_id: int) -> str | None:
    """The holder of the lock study ``study_id``; a lock left unnamed past a short wait (its
    creator died in between) or already deleted has none."""
    deadline = time.monotonic() + OWNERLESS_WAIT_S
    while True:
        try:
            owner = storage.get_study_user_attrs(study_id)
        except KeyError:
            return None
        if "heartbeat" in owner or time.monotonic() > deadline:
            return holder(owner)
        time.sleep(0.1)


def _delete(storage: Any, study_id: int) -> None:
    try:
        storage.delete_study(study_id)
    except KeyError:  # already gone
        pass


# What a study stores, read back as untrusted data: well-formed, or refused with the trial named.

_INT_FIELDS = {
    "computed": (1, None),
    "order": (0, 2),
    "cfg_interval": (1, 6),
    "block_fn": (0, 2),
    "block_bn": (0, 1),
}
_FLOAT_FIELDS = {"cfg_full": (0.0, 1.0), "block_threshold": (0.03, 0.5)}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


class Malformed(SearchError):
    """A study's stored value that this version of stepcache did not write."""

    def __init__(self, study_name: str, where: str, what: str):
        super().__init__(
            f"storage: {where} of study {study_name!r} holds a malformed {what}; it was not written by "
            "this version of stepcache (or was altered): pass another --study or --storage"
        )


def checked_candidate(d: Any, num_steps: int) -> Candidate:
    """The candidate a stored dict describes, every field in the range the search draws it from."""
    if not isinstance(d, dict) or not {"computed", "order"} <= d.keys() <= (
        _INT_FIELDS.keys() | _FLOAT_FIELDS.keys() | {"cfg_mode", "stride", "expansion", "damping"}
    ):
        raise ValueError("candidate")
    for name, (lo, hi) in _INT_FIELDS.items():
        v = d.get(name, lo)
        if not _is_int(v) or v < lo or v > (num_steps if hi is None else hi):
            raise ValueError(f"candidate {name}")
    for name, (lo, hi) in _FLOAT_FIELDS.items():
        v = d.get(name, lo)
        if not _is_real(v) or not lo <= v <= hi:
            raise ValueError(f"candidate {name}")
    if d.get("cfg_mode", CFG_MODES[0]) not in CFG_MODES:
        raise ValueError("candidate cfg_mode")
    if not _is_int(d.get("stride", 0)) or d.get("stride", 0) not in STRIDES:
        raise ValueError("candidate stride")
    if d.get("expansion", EXPANSIONS[0]) not in EXPANSIONS:
        raise ValueError("candidate expansion")
    if not _is_real(d.get("damping", 1.0)) or d.get("damping", 1.0) not in DAMPINGS:
        raise ValueError("candidate damping")
    return Candidate(**d)


def checked_point(p: Any, num_steps: int) -> Point:
    """A stored evaluation: the candidate, its schedule and what was measured."""
    if not isinstance(p, dict):
        raise ValueError("point")
    cand = checked_candidate(p.get("candidate"), num_steps)
    mask, actions, rows = p.get("mask"), p.get("actions"), p.get("row_actions", [])
    if not (isinstance(mask, list) and len(mask) == num_steps and all(isinstance(m, bool) for m in mask)):
        raise ValueError("point mask")
    if not mask[0] or sum(mask) != cand.computed:
        raise ValueError("point mask")
    if not (isinstance(actions, str) and len(actions) == num_steps and set(actions) <= set("CEG")):
        raise ValueError("point actions")
    if not (isinstance(rows, list) and all(isinstance(r, str) and r and set(r) <= set("CEGP") for r in rows)):
        raise ValueError("point row_actions")
    if rows and len(rows) != num_steps:
        raise ValueError("point row_actions")
    psnr, speed, cost = p.get("psnr"), p.get("speedup"), p.get("cost")
    if not (_is_real(psnr) and _is_real(speed) and speed > 0 and _is_real(cost) and 0 <= cost <= 1):
        raise ValueError("point psnr, speedup or cost")
    adherence, median = p.get("adherence"), p.get("psnr_median")
    if adherence is not None and not (_is_real(adherence) and 0 <= adherence <= 1):
        raise ValueError("point adherence")
    if median is not None and not _is_real(median):
        raise ValueError("point psnr_median")
    weights = p.get("weights")
    if cand.fitted != (weights is not None):
        raise ValueError("point weights")  # a fitted candidate's point holds them; no other does
    if weights is not None:  # checked as the policy they go into checks them
        try:
            weights = cand.policy(mask, cfg=False, weights=weights).rules["step"].params["weights"]
        except PolicyError:
            raise ValueError("point weights") from None
    return Point(
        candidate=cand,
        psnr=float(psnr),
        speedup=float(speed),
        actions=actions,
        mask=list(mask),
        cost=float(cost),
        row_actions=list(rows),
        adherence=None if adherence is None else float(adherence),
        psnr_median=None if median is None else float(median),
        weights=weights,
    )


def checked_cost_model(d: Any) -> CostModel:
    names = {f.name for f in dataclasses.fields(CostModel)}
    if not isinstance(d, dict) or d.keys() != names:
        raise ValueError("cost model")
    if not _is_int(d["num_blocks"]) or d["num_blocks"] < 0:
        raise ValueError("cost model")
    reals = [d[n] for n in names - {"num_blocks"}]
    if not all(_is_real(v) and v >= 0 for v in reals) or d["full"] <= 0:
        raise ValueError("cost model")
    return CostModel(**d)


def checked_proposal(d: Any, num_steps: int) -> tuple[int, int | None, Candidate]:
    """Where in the study's sequence a trial was proposed, which planner seed it is (if one), and
    the candidate."""
    if not isinstance(d, dict) or d.keys() != {"at", "seed", "candidate"}:
        raise ValueError("proposal")
    at, seed = d["at"], d["seed"]
    if not _is_int(at) or at < 0 or not (seed is None or (_is_int(seed) and seed >= 0)):
        raise ValueError("proposal")
    return at, seed, checked_candidate(d["candidate"], num_steps)
