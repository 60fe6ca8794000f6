"""HTML reports of a batch: one page per recording and an index, readable offline by clinicians.

``write_reports(out, rows)`` turns ledger rows (:meth:`mam.batch.Ledger.rows`) into
``out/index.html`` and ``out/reports/rec-<hash>.html`` with a PNG of per-clip P(FMs) over time, the
top FMs clips to review (the paper shows that reviewing them lifts beginners' accuracy by 11 %),
quality and warnings, the model, and the decision-support disclaimer. With ``clips=True`` the top
clips are also cut into MP4 files with the skeleton drawn (:mod:`mam.batch.review_clips`).

Rules, and why:

* Offline: inline CSS, no scripts, no external fonts; links and pictures are relative, so the
  folder can be copied or zipped. The markup is in Jinja templates (``mam/batch/templates``),
  autoescaped like the review app's; numbers are shown through ``mam.presentation``.
* Archive file names often hold patients' names: page, picture and clip file names are hashes
  (of the path and id, or of the job key), never the path or id; every string from the data is
  HTML-escaped.
* Every file is written to a temporary name and renamed, so a killed run leaves old or new
  files, never half-written ones; rerunning overwrites (clips already cut are kept: their names
  are content-addressed).
* Logs carry counts only.
"""

from __future__ import annotations

import functools
import hashlib
import html
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
from markupsafe import Markup

from mam import DISCLAIMER
from mam.files import write_atomic
from mam.gma import FMS_CLIP_THRESHOLD
from mam.pose.base import available_backends, default_pose_backend
from mam.presentation import mmss, probability

__all__ = ["CLIPS_DIR", "INDEX", "REPORTS_DIR", "REVIEW_NOTE", "clip_name", "mmss", "page_stem",
           "plot_clips", "write_reports"]  # fmt: skip

logger = logging.getLogger(__name__)

REPORTS_DIR = "reports"
CLIPS_DIR = "clips"
INDEX = "index.html"
CLIPS_VERSION = "1"  # part of clip file names: bump when drawing changes, so old files are redone
REVIEW_NOTE = (
    "Review these clips first: they are the ones the model found most likely to show fidgety "
    "movements. In the MAM paper (Gao, Yao et al., Nat. Commun. 2023), reviewing the top FMs "
    "clips lifted beginners' assessment accuracy by 11%."
)

_TEMPLATES = Path(__file__).resolve().parent / "templates"


# -- small helpers --------------------------------------------------------------------------------
def _escape(value: object) -> Markup:
    """Every value a template prints, HTML-escaped as ``html.escape`` does (Jinja's autoescape
    is on; this keeps the entities the pages always had); markup the templates made is kept."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(str(value), quote=True))


@functools.cache
def _env() -> jinja2.Environment:
    """The report's templates (``mam/batch/templates``), autoescaped like the review app's."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_TEMPLATES),
        autoescape=True,
        finalize=_escape,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(prob=probability, mmss=mmss, fmt=format)
    env.globals.update(DISCLAIMER=DISCLAIMER, REVIEW_NOTE=REVIEW_NOTE, REPORTS_DIR=REPORTS_DIR,
                       CLIPS_DIR=CLIPS_DIR, FMS_CLIP_THRESHOLD=FMS_CLIP_THRESHOLD)  # fmt: skip
    return env


def _digest(*parts: object) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:16]


def page_stem(row: dict) -> str:
    """File stem of a recording's page and picture: a hash of its path and id (both may name a
    patient), stable across runs so rerunning overwrites the same files."""
    return "rec-" + _digest(row.get("path", ""), row.get("id", ""))


def clip_name(row: dict, start_s: float, end_s: float) -> str:
    """Content-addressed clip file name: the same recording (job key) and times give the same
    file, so duplicates share it and a rerun reuses it."""
    key = row.get("key") or row.get("sha256") or page_stem(row)
    return f"clip-{_digest(key, f'{start_s:.2f}', f'{end_s:.2f}', CLIPS_VERSION)}.mp4"


# -- one recording --------------------------------------------------------------------------------
@dataclass
class _Rec:
    row: dict
    stem: str
    result: object | None = None  # mam.schemas.ScreeningResult
    error_code: str = ""
    error: str = ""
    clips: dict[int, object] = field(default_factory=dict)  # clip index -> ReviewClip
    clips_note: str = ""


def _parse(row: dict) -> _Rec:
    from pydantic import ValidationError

    from mam.schemas import ScreeningResult

    rec = _Rec(row, page_stem(row))
    if row.get("status") == "done":
        try:
            rec.result = ScreeningResult.model_validate_json(row.get("result") or "")
        except ValidationError:
            rec.error_code, rec.error = "invalid_result", "the stored result cannot be read"
    else:
        # not_screened: the run was killed before this recording's turn (as in results.csv).
        rec.error_code = row.get("error_code") or "not_screened"
        rec.error = row.get("error") or ""
    return rec


def plot_clips(result, dest: Path) -> None:
    """PNG of per-clip P(FMs) over time: each clip a bar from its start to its end, the 0.5
    threshold dashed, the top clips highlighted and numbered as in the table."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig = Figure(figsize=(9, 2.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.07, 0.18, 0.91, 0.68))
    clips = result.clips
    top = {c.index: rank for rank, c in enumerate(result.top_fms_clips, start=1)}
    if clips:
        mids = [(c.start_s + c.end_s) / 2 for c in clips]
        ax.plot(mids, [c.fms_probability for c in clips], color="#9db4d0", lw=1, zorder=1)
        plain = [c for c in clips if c.index not in top]
        ax.hlines(
            [c.fms_probability for c in plain],
            [c.start_s for c in plain],
            [c.end_s for c in plain],
            color="#1f5fa8",
            lw=3,
            alpha=0.7,
            zorder=2,
            label="clip",
        )
        for c in clips:
            if c.index in top:
                ax.hlines(c.fms_probability, c.start_s, c.end_s, color="#e07000", lw=5, zorder=3)
                ax.annotate(
                    str(top[c.index]),
                    ((c.start_s + c.end_s) / 2, c.fms_probability),
                    xytext=(0, 6),
                    textcoords="offset points",
                    ha="center",
                    fontsize=9,
                    color="#a04f00",
                    fontweight="bold",
                )
        ax.plot([], [], color="#e07000", lw=5, label="top FMs clip (numbered)")
    else:
        ax.text(0.5, 0.5, "no clips assessed", transform=ax.transAxes, ha="center")
    ax.axhline(FMS_CLIP_THRESHOLD, ls="--", color="#666", lw=1, label="P(FMs) = 0.5")
    end = max([result.quality.duration_s] + [c.end_s for c in clips])
    ax.set_xlim(0, max(end, 1.0))
    ax.set_ylim(-0.04, 1.1)
    ax.set_ylabel("P(FMs)")
    ax.set_xlabel("recording time (mm:ss)")
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, steps=[1, 1.5, 3, 6, 10]))  # whole minutes
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: mmss(x)))
    ax.grid(axis="y", color="#e5e5e5")
    ax.legend(loc="lower right", bbox_to_anchor=(1, 1), fontsize=8, ncols=3, frameon=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_atomic(dest, buf.getvalue())


def _page(rec: _Rec, want_clips: bool) -> bytes:
    """One recording's page (``templates/page.html``)."""
    disclaimer = getattr(rec.result, "disclaimer", None) or DISCLAIMER
    view: dict = {"rec": rec, "want_clips": want_clips, "disclaimer": disclaimer}
    r = rec.result
    if r is not None:
        q, m = r.quality, r.model
        view |= {
            "n_fms": sum(c.fms_probability > FMS_CLIP_THRESHOLD for c in r.clips),
            "warnings": list(dict.fromkeys([*r.warnings, *q.warnings])),
            "quality_rows": [
                (
                    "Tracked",
                    f"{q.tracked_fraction:.0%} of {q.frames_total} frames ({q.duration_s:.1f} s)",
                ),
                ("Interpolated frames", str(q.frames_interpolated)),
                ("Longest gap", f"{q.longest_gap_s:.2f} s"),
                ("Mean confidence", f"{q.mean_confidence:.2f}"),
                ("Clips assessed", str(q.clips_assessed)),
            ],
            "model_rows": [
                ("Model", f"{m.name} {m.version}"),
                ("Runtime", f"{m.runtime} on {m.device} ({m.precision})"),
                ("Pose", m.pose_backend),
                ("Infant data (Info branch)", "used" if m.used_info_branch else "not used"),
                ("Calibration", m.calibration),
                ("Model digest", (m.digest or "unknown")[:16] + "…"),
                ("Weights sha256", m.weights_sha256[:16] + "…"),
                ("Provenance", m.provenance),
            ],
        }
    return _env().get_template("page.html").render(view).encode()


# -- index ----------------------------------------------------------------------------------------
def _index(recs: list[_Rec]) -> bytes:
    """The index of all recordings (``templates/index.html``)."""
    done = sum(r.result is not None for r in recs)
    risk = sum(r.result is not None and r.result.classification.label == "risk" for r in recs)
    view = {"recs": recs, "done": done, "risk": risk}
    return _env().get_template("index.html").render(view).encode()


# -- clips ----------------------------------------------------------------------------------------
class _PoseHolder:
    """One pose backend per name for all clips of a run, each made on first use (~1 s): the
    skeleton is drawn by the backend that scored the recording (``model.pose_backend``)."""

    def __init__(self) -> None:
        self.poses: dict[str, object] = {}
        self.errors: dict[str, str] = {}

    def get(self, name: str):
        if name not in self.poses and name not in self.errors:
            from mam.errors import MamError
            from mam.pose import create_backend

            try:
                self.poses[name] = create_backend(name)
            except (MamError, ValueError) as e:
                self.errors[name] = f"{getattr(e, 'code', 'invalid')}: {e}"
        return self.poses.get(name)

    def close(self) -> None:
        for pose in self.poses.values():
            pose.close()


def _cut_clips(rec: _Rec, video: Path | None, clips_dir: Path, holder: _PoseHolder) -> int:
    """Cut a done recording's top clips; notes instead of errors. Returns clips cut anew."""
    from mam.batch.review_clips import cut_review_clips

    r = rec.result
    if not r.top_fms_clips:
        return 0
    if video is None:
        rec.clips_note = "no video for this recording (pose file, or the file is not available)"
        return 0
    if not Path(video).is_file():
        rec.clips_note = "the recording is no longer at its path"
        return 0
    backend = r.model.pose_backend
    if backend not in available_backends():  # screened from a pose file: draw with the default
        backend = default_pose_backend()
    pose = holder.get(backend)
    if pose is None:
        rec.clips_note = f"the pose estimator is not available ({holder.errors[backend]})"
        return 0
    spans = [(c.start_s, c.end_s) for c in r.top_fms_clips]
    names = [clip_name(rec.row, a, b) for a, b in spans]
    cut = cut_review_clips(video, spans, clips_dir, names, pose=pose)
    rec.clips = {c.index: rc for c, rc in zip(r.top_fms_clips, cut)}
    return sum(not rc.reused and rc.file is not None for rc in cut)


# -- entry point ----------------------------------------------------------------------------------
def write_reports(
    out: Path,
    rows: list[dict],
    *,
    recording_of: Callable[[dict], Path | None] | None = None,
    clips: bool = False,
) -> Path:
    """Write ``out/index.html`` and one page (plus its PNG) per row under ``out/reports/``.

    ``rows`` are :meth:`mam.batch.Ledger.rows` dicts. With ``clips``, the top FMs clips of each
    done row whose recording ``recording_of(row)`` returns are cut to ``out/reports/clips/``;
    a clip that cannot be cut becomes a note on its page. Returns the index's path."""
    t0 = time.perf_counter()
    out = Path(out)
    reports = out / REPORTS_DIR
    reports.mkdir(parents=True, exist_ok=True)
    recs = [_parse(row) for row in rows]
    holder = _PoseHolder()
    n_cut = 0
    try:
        for rec in recs:
            if rec.result is None:
                continue
            if clips:
                video = recording_of(rec.row) if recording_of is not None else None
                n_cut += _cut_clips(rec, video, reports / CLIPS_DIR, holder)
            plot_clips(rec.result, reports / f"{rec.stem}.png")
    finally:
        holder.close()
    for rec in recs:
        write_atomic(reports / f"{rec.stem}.html", _page(rec, clips))
    index = out / INDEX
    write_atomic(index, _index(recs))
    failed_clips = sum(rc.file is None for rec in recs for rc in rec.clips.values())
    logger.info(
        "reports: %d pages, %d clips cut, %d clips failed, in %.1f s",
        len(recs), n_cut, failed_clips, time.perf_counter() - t0,
    )  # fmt: skip
    return index
