"""The beginner-assist study as a feature: does the model's assistance make assessors more accurate?

The paper (its Fig. 4b) had three GMA beginners assess each video twice, without and with MAM's
clips of high P(FMs) shown, and compared their accuracy against the experts': +11.0 percentage
points on average. Here an admin defines a study: a set of screened recordings, the assessors,
the order of the two sessions of a recording (``without_first``, ``with_first`` or ``random``:
drawn per assessor and recording from the study's seed) and a washout (at least ``washout_days``
and at least ``washout_recordings`` other verdicts between an assessor's two sessions of one
recording, so the second is not a memory of the first). Each assessor sees every first session
at once and a second session only once its washout has passed (:func:`sessions`). The
without-assistance session shows no model output (as blind review does; the ordinary pages hide
the model from that assessor for that recording too until it is done, :func:`hidden_rids`); the
with-assistance session shows the model's top clips by P(FMs). Each session's verdict (group
normal / risk) is kept apart from the assessor's ordinary review.

:func:`report` compares each assessor's verdicts with the senior's signed-off groups (risk is the
positive class): accuracy, sensitivity and specificity per session kind with Wilson 95% intervals,
the paired change in accuracy (with minus without, over the recordings with both) with a
percentile bootstrap interval over recordings, and the assessors' mean change, bootstrapped over
the same resampled recordings for all assessors.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import binomtest

from mam.errors import InputError
from mam.gma import GROUPS
from mam.review.store import ReviewInputError, ReviewStore

ARMS = ("without", "with")  # without / with the model's assistance
ARM_LABELS = {"without": "without assistance", "with": "with the model's assistance"}
ORDERS = ("without_first", "with_first", "random")
POSITIVE = "risk"
BOOTSTRAP = 2000
DAY_S = 86400.0
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class StudyError(InputError):
    """A study that cannot be made, or a session that cannot be recorded."""

    code = "invalid_study"


class UnknownStudy(StudyError):
    code = "unknown_study"


class NotDue(StudyError):
    """The session is not (or no longer) on the assessor's study worklist."""

    code = "study_session_not_due"


@dataclass(frozen=True)
class Study:
    name: str
    recordings: tuple[str, ...]  # rids
    assessors: tuple[str, ...]
    order: str = "random"
    seed: int = 0
    washout_days: float = 14.0
    washout_recordings: int = 0
    created_by: str = ""
    created_at: float = 0.0

    def spec(self) -> dict:
        d = asdict(self)
        for k in ("name", "created_by", "created_at"):
            d.pop(k)
        d["recordings"], d["assessors"] = list(self.recordings), list(self.assessors)
        return d


def create_study(
    store: ReviewStore, name: str, recordings, assessors, *, order: str = "random",
    seed: int = 0, washout_days: float = 14.0, washout_recordings: int = 0, by: str = "",
    now: float | None = None,
) -> Study:  # fmt: skip
    """Define and store a study. ``recordings`` are rids the caller has checked are screened;
    ``assessors`` user names. :class:`StudyError` for a bad definition or a taken name."""
    name = (name or "").strip()
    if not NAME.match(name):
        raise StudyError("a study name is 1-64 letters, digits, '_' or '-'")
    recs = tuple(dict.fromkeys(r for r in recordings if r))
    people = tuple(dict.fromkeys(a.strip() for a in assessors if a and a.strip()))
    if len(recs) < 2:
        raise StudyError("a study needs at least 2 recordings")
    if not people:
        raise StudyError("a study needs at least one assessor")
    if order not in ORDERS:
        raise StudyError(f"the order is one of {', '.join(ORDERS)}")
    try:
        seed, days, gap = int(seed), float(washout_days), int(washout_recordings)
    except (TypeError, ValueError):
        raise StudyError(
            "seed and washout recordings are whole numbers, washout days a number"
        ) from None
    if not (0 <= days <= 365) or not (0 <= gap <= 10_000) or seed < 0:
        raise StudyError("the washout is 0-365 days and 0-10000 recordings; the seed >= 0")
    study = Study(name, recs, people, order, seed, days, gap, by,
                  time.time() if now is None else now)  # fmt: skip
    try:
        store.create_study(name, study.spec(), by, study.created_at)
    except ReviewInputError as e:
        raise StudyError(str(e)) from None
    return study


def _study(d: dict) -> Study:
    return Study(
        d["name"], tuple(d["recordings"]), tuple(d["assessors"]), d["order"], d["seed"],
        d["washout_days"], d["washout_recordings"], d["created_by"], d["created_at"],
    )  # fmt: skip


def list_studies(store: ReviewStore) -> list[Study]:
    return [_study(d) for d in store.studies()]


def get_study(store: ReviewStore, name: str) -> Study:
    for s in list_studies(store):
        if s.name == name:
            return s
    raise UnknownStudy("no study of that name")


def schedule(study: Study, assessor: str) -> list[tuple[str, str]]:
    """``[(rid, first session's arm)]`` in the order the assessor is shown them: the study's
    order for fixed orders; for ``random`` the recordings shuffled and each first arm drawn
    from a generator seeded by the study's seed and the assessor (reproducible, different per
    assessor)."""
    if study.order != "random":
        first = "without" if study.order == "without_first" else "with"
        return [(r, first) for r in study.recordings]
    key = [study.seed, *assessor.encode()]
    rng = np.random.default_rng(key)
    recs = [study.recordings[i] for i in rng.permutation(len(study.recordings))]
    return [(r, ARMS[int(b)]) for r, b in zip(recs, rng.integers(0, 2, len(recs)))]


def sessions(
    store: ReviewStore, study: Study, assessor: str, now: float | None = None
) -> list[dict]:
    """The assessor's two sessions per recording: ``{rid, arm, first, state}`` with state
    ``done`` (and its ``group``), ``due`` or ``waiting`` (a second session inside its washout:
    ``due_at`` and ``more_recordings`` still needed). First sessions come first, in
    :func:`schedule`'s order, then second sessions."""
    if assessor not in study.assessors:
        return []
    now = time.time() if now is None else now
    done = {(v["recording"], v["arm"]): v for v in store.study_verdicts(study.name, assessor)}
    times = sorted(v["at"] for v in done.values())
    firsts, seconds = [], []
    for rid, arm in schedule(study, assessor):
        other = ARMS[1 - ARMS.index(arm)]
        v1 = done.get((rid, arm))
        firsts.append({"rid": rid, "arm": arm, "first": True,
                       "state": "done" if v1 else "due",
                       "group": v1["group"] if v1 else None})  # fmt: skip
        v2 = done.get((rid, other))
        s2 = {"rid": rid, "arm": other, "first": False, "state": "done" if v2 else "waiting",
              "group": v2["group"] if v2 else None}  # fmt: skip
        if v2 is None and v1 is not None:
            due_at = v1["at"] + study.washout_days * DAY_S
            since = sum(t > v1["at"] for t in times)
            more = max(0, study.washout_recordings - since)
            if now >= due_at and more == 0:
                s2["state"] = "due"
            else:
                s2["due_at"], s2["more_recordings"] = due_at, more
        seconds.append(s2)
    return firsts + seconds


def due(store: ReviewStore, study: Study, assessor: str, now: float | None = None):
    """``[(rid, arm)]`` the assessor may do now."""
    return [(s["rid"], s["arm"]) for s in sessions(store, study, assessor, now)
            if s["state"] == "due"]  # fmt: skip


def record_verdict(
    store: ReviewStore, study: Study, assessor: str, rid: str, arm: str, group: str,
    now: float | None = None,
) -> None:  # fmt: skip
    """Record the group the assessor gave in one session; :class:`NotDue` unless that session
    is due for them now (not theirs, already done, or inside its washout)."""
    if group not in GROUPS:
        raise StudyError(f"the verdict is one of {', '.join(GROUPS)}")
    now = time.time() if now is None else now
    if (rid, arm) not in due(store, study, assessor, now):
        raise NotDue("this session is not due for you")
    try:
        store.add_study_verdict(study.name, assessor, rid, arm, group, now)
    except ReviewInputError as e:  # the same session sent twice at once
        raise NotDue(str(e)) from None


def hidden_rids(store: ReviewStore, assessor: str) -> set[str]:
    """Recordings whose model output the ordinary pages must hide from ``assessor``: those with
    a without-assistance session of theirs not yet done, in any study."""
    hidden: set[str] = set()
    for study in list_studies(store):
        if assessor in study.assessors:
            done = {v["recording"] for v in store.study_verdicts(study.name, assessor)
                    if v["arm"] == "without"}  # fmt: skip
            hidden |= set(study.recordings) - done
    return hidden


# -- the report -----------------------------------------------------------------------------------
def wilson(k: int, n: int) -> dict:
    """``{"k", "n", "value", "ci"}``: the proportion k/n with its Wilson 95% interval."""
    if n == 0:
        return {"k": 0, "n": 0, "value": None, "ci": None}
    ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
    return {"k": k, "n": n, "value": k / n, "ci": [float(ci.low), float(ci.high)]}


def _rates(pairs: list[tuple[str, str]]) -> dict:
    tp = sum(v == POSITIVE and r == POSITIVE for v, r in pairs)
    tn = sum(v != POSITIVE and r != POSITIVE for v, r in pairs)
    pos = sum(r == POSITIVE for _, r in pairs)
    return {"accuracy": wilson(tp + tn, len(pairs)), "sensitivity": wilson(tp, pos),
            "specificity": wilson(tn, len(pairs) - pos)}  # fmt: skip


def _interval(samples: np.ndarray) -> list[float] | None:
    samples = samples[~np.isnan(samples)]
    if samples.size == 0:
        return None
    return [float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))]


def report(
    store: ReviewStore, study: Study, bootstrap: int = BOOTSTRAP, seed: int = 0
) -> dict:  # fmt: skip
    """Each assessor's accuracy, sensitivity and specificity without and with the model's
    assistance against the signed-off groups, the paired change and the assessors' mean change
    (see the module's docstring). Recordings not signed off, or signed off without a group
    (abnormal FMs, not assessable), are left out and counted."""
    finals = store.final_groups(study.recordings)
    ref = {r: g for r, g in finals.items() if g in GROUPS}
    recs = [r for r in study.recordings if r in ref]
    col = {r: i for i, r in enumerate(recs)}
    verdicts = store.study_verdicts(study.name)
    # correct[a, arm][i]: 1 / 0 for a verdict on recording i, NaN for none
    correct = {}
    out = []
    for a in study.assessors:
        mine = [v for v in verdicts if v["assessor"] == a]
        row = {"assessor": a, "sessions_done": len(mine),
               "sessions_total": 2 * len(study.recordings)}  # fmt: skip
        for arm in ARMS:
            c = np.full(len(recs), np.nan)
            pairs = []
            for v in mine:
                if v["arm"] == arm and v["recording"] in col:
                    pairs.append((v["group"], ref[v["recording"]]))
                    c[col[v["recording"]]] = float(v["group"] == ref[v["recording"]])
            correct[a, arm] = c
            row[arm] = _rates(pairs)
        out.append(row)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(recs), (bootstrap, len(recs))) if recs else None
    diffs = []
    for row in out:
        d = correct[row["assessor"], "with"] - correct[row["assessor"], "without"]
        paired = ~np.isnan(d)
        change = {"n": int(paired.sum()), "value": None, "ci": None}
        if paired.any():
            change["value"] = float(d[paired].mean())
            with np.errstate(invalid="ignore"):
                boot = _nanmean_rows(d[idx])
            change["ci"] = _interval(boot)
            diffs.append(d)
        row["change"] = change
    mean = {"assessors": len(diffs), "value": None, "ci": None}
    if diffs:
        per = [float(np.nanmean(d)) for d in diffs]
        mean["value"] = float(np.mean(per))
        boot = np.nanmean(np.stack([_nanmean_rows(d[idx]) for d in diffs]), axis=0)
        mean["ci"] = _interval(boot)
    return {
        "study": study.name, "recordings": len(study.recordings), "reference": len(recs),
        "not_signed_off": len(study.recordings) - len(finals),
        "no_group": len(finals) - len(recs), "order": study.order, "seed": study.seed,
        "washout_days": study.washout_days, "washout_recordings": study.washout_recordings,
        "bootstrap": bootstrap, "assessors": out, "mean_change": mean,
    }  # fmt: skip


def _nanmean_rows(m: np.ndarray) -> np.ndarray:
    """Row means ignoring NaN; NaN for a row with none (a resample without a paired recording),
    without numpy's warning."""
    n = (~np.isnan(m)).sum(axis=1)
    s = np.nansum(m, axis=1)
    return np.where(n > 0, s / np.maximum(n, 1), np.nan)


def _pct(x: dict) -> str:
    if x["value"] is None:
        return "n/a"
    lo, hi = x["ci"]
    return f"{100 * x['value']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] ({x['k']}/{x['n']})"


def _change(x: dict) -> str:
    if x["value"] is None:
        return "n/a"
    ci = f" [{100 * x['ci'][0]:+.1f}, {100 * x['ci'][1]:+.1f}]" if x["ci"] else ""
    return f"{100 * x['value']:+.1f} points{ci}"


def format_report(rep: dict) -> str:
    """The report as text (counts and rates only: no recording is named)."""
    lines = [
        f"study {rep['study']}: {rep['recordings']} recordings, {rep['reference']} with a "
        f"signed-off group ({rep['not_signed_off']} not signed off, {rep['no_group']} without a "
        f"group); order {rep['order']}, washout {rep['washout_days']:g} days and "
        f"{rep['washout_recordings']} recordings",
        "reference: the senior's signed-off group (risk positive); 95% Wilson intervals; change: "
        f"with minus without, paired by recording, {rep['bootstrap']}-sample bootstrap interval",
    ]
    for row in rep["assessors"]:
        lines.append(f"{row['assessor']} ({row['sessions_done']}/{row['sessions_total']} "
                     "sessions)")  # fmt: skip
        for arm in ARMS:
            r = row[arm]
            lines.append(
                f"  {ARM_LABELS[arm]}: accuracy {_pct(r['accuracy'])}; sensitivity "
                f"{_pct(r['sensitivity'])}; specificity {_pct(r['specificity'])}"
            )
        lines.append(f"  change in accuracy: {_change(row['change'])} over "
                     f"{row['change']['n']} recordings")  # fmt: skip
    m = rep["mean_change"]
    lines.append(f"mean change in accuracy over {m['assessors']} assessors: {_change(m)} "
                 "(the paper's beginners: +11.0 points)")  # fmt: skip
    return "\n".join(lines)
