"""HTML reports of a batch: one page per recording and an index, readable offline by clinicians.

``write_reports(out, rows)`` turns ledger rows (:meth:`mam.batch.Ledger.rows`) into
``out/index.html`` and ``out/reports/rec-<hash>.html`` with a PNG of per-clip P(FMs) over time, the
top FMs clips to review (the paper shows that reviewing them lifts beginners' accuracy by 11 %),
quality and warnings, the model, and the decision-support disclaimer. With ``clips=True`` the top
clips are also cut into MP4 files with the skeleton drawn (:mod:`mam.batch.review_clips`).

Rules, and why:

* Offline: inline CSS, no scripts, no external fonts; links and pictures are relative, so the
  folder can be copied or zipped.
* Archive file names often hold patients' names: page, picture and clip file names are hashes
  (of the path and id, or of the job key), never the path or id; every string from the data is
  HTML-escaped.
* Every file is written to a temporary name and renamed, so a killed run leaves old or new
  files, never half-written ones; rerunning overwrites (clips already cut are kept: their names
  are content-addressed).
* Logs carry counts only.
"""

from __future__ import annotations

import hashlib
import html
import io
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mam import DISCLAIMER
from mam.files import write_atomic
from mam.gma import FMS_CLIP_THRESHOLD
from mam.pose.base import available_backends, default_pose_backend

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

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Arial,sans-serif;margin:0 auto;
max-width:1100px;padding:1rem 1.5rem;color:#1a1a1a;line-height:1.4}
h1{font-size:1.5rem;margin:.5rem 0}h2{font-size:1.15rem;margin:1.5rem 0 .5rem;
border-bottom:1px solid #ccc}
.disclaimer{border:3px solid #b35900;background:#fff4e0;padding:.75rem 1rem;font-weight:600;
margin:.75rem 0}
table{border-collapse:collapse;margin:.25rem 0}th,td{border:1px solid #ccc;padding:.3rem .5rem;
text-align:left;vertical-align:top}th{background:#f0f0f0}td.num{text-align:right;
font-variant-numeric:tabular-nums}
.risk{color:#fff;background:#b00020;padding:.1rem .5rem;border-radius:3px;font-weight:700}
.normal{color:#fff;background:#1b6e20;padding:.1rem .5rem;border-radius:3px;font-weight:700}
.indeterminate{color:#000;background:#f2c94c;padding:.1rem .5rem;border-radius:3px;font-weight:700}
.failed{color:#fff;background:#555;padding:.1rem .5rem;border-radius:3px;font-weight:700}
.big{font-size:1.3rem}.muted{color:#555}.note{background:#f5f5f5;padding:.5rem .75rem}
code,.path{font-family:ui-monospace,Menlo,Consolas,monospace;word-break:break-all}
img{max-width:100%;height:auto}video{max-width:360px;display:block}
ul.warn li{color:#7a3e00}
"""


# -- small helpers --------------------------------------------------------------------------------
def _e(value: object) -> str:
    """HTML-escape anything that comes from data (ids, paths, messages)."""
    return html.escape(str(value), quote=True)


def _prob(x: float) -> str:
    """Three decimals, without printing a tiny probability as if it were zero (HTML-ready)."""
    return "&lt;0.001" if x < 0.0005 else "&gt;0.999" if x > 0.9995 else f"{x:.3f}"


def mmss(seconds: float, up: bool = False) -> str:
    """``mm:ss`` (``h:mm:ss`` from an hour), rounded down, or up with ``up`` (a clip's end)."""
    s = math.ceil(seconds - 1e-9) if up else math.floor(seconds + 1e-9)
    h, rest = divmod(max(0, s), 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


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


def _html(title: str, body: str) -> bytes:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="robots" content="noindex">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n{body}\n</body></html>\n"
    ).encode()


def _disclaimer(text: str = DISCLAIMER) -> str:
    return f'<p class="disclaimer" role="note">{_e(text)}</p>'


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


def _clip_cell(rec: _Rec, index: int) -> str:
    clip = rec.clips.get(index)
    if clip is None:
        return f'<td class="muted">{_e(rec.clips_note or "not cut")}</td>'
    if clip.file is None:
        return f'<td class="muted">could not be cut: {_e(clip.error)}</td>'
    src = f"{CLIPS_DIR}/{clip.file.name}"
    return (
        f'<td><video controls preload="metadata" src="{_e(src)}"></video>'
        f'<a href="{_e(src)}">open the clip</a></td>'
    )


def _page_done(rec: _Rec, want_clips: bool) -> str:
    r = rec.result
    label = r.classification.label
    th = r.fms_category_thresholds
    thresholds = ", ".join(f"{_e(k)} &ge; {v:.2f}" for k, v in th.items())
    n_fms = sum(c.fms_probability > FMS_CLIP_THRESHOLD for c in r.clips)
    rows = []
    for rank, c in enumerate(r.top_fms_clips, start=1):
        rows.append(
            f"<tr><td class=num>{rank}</td><td>{mmss(c.start_s)}&ndash;{mmss(c.end_s, up=True)}"
            f'</td><td class="num muted">{c.start_s:.1f}&ndash;{c.end_s:.1f} s</td>'
            f"<td class=num>{_prob(c.fms_probability)}</td>"
            f"<td class=num>{c.attention_weight:.3f}</td>"
            + (_clip_cell(rec, c.index) if want_clips else "")
            + "</tr>"
        )
    clip_head = "<th>Clip with skeleton</th>" if want_clips else ""
    top_table = (
        "<table><tr><th>#</th><th>Time (mm:ss)</th><th>Seconds</th><th>P(FMs)</th>"
        f"<th>Attention weight</th>{clip_head}</tr>" + "".join(rows) + "</table>"
        if rows
        else "<p>No clips were assessed.</p>"
    )
    if want_clips and rec.clips_note and not rec.clips:
        top_table += f'<p class="note">Review clips: {_e(rec.clips_note)}</p>'
    q = r.quality
    warnings = list(dict.fromkeys([*r.warnings, *q.warnings]))
    warn = (
        '<ul class="warn">' + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul>"
        if warnings
        else "<p>None.</p>"
    )
    m = r.model
    model_rows = [
        ("Model", f"{m.name} {m.version}"),
        ("Runtime", f"{m.runtime} on {m.device} ({m.precision})"),
        ("Pose", m.pose_backend),
        ("Infant data (Info branch)", "used" if m.used_info_branch else "not used"),
        ("Calibration", m.calibration),
        ("Model digest", (m.digest or "unknown")[:16] + "…"),
        ("Weights sha256", m.weights_sha256[:16] + "…"),
        ("Provenance", m.provenance),
    ]
    quality_rows = [
        ("Tracked", f"{q.tracked_fraction:.0%} of {q.frames_total} frames ({q.duration_s:.1f} s)"),
        ("Interpolated frames", str(q.frames_interpolated)),
        ("Longest gap", f"{q.longest_gap_s:.2f} s"),
        ("Mean confidence", f"{q.mean_confidence:.2f}"),
        ("Clips assessed", str(q.clips_assessed)),
    ]

    def table(pairs: list[tuple[str, str]]) -> str:
        body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in pairs)
        return f"<table>{body}</table>"

    d = r.domain
    domain = (
        f"in domain (score {d.score:.2f}, in domain up to {d.threshold:.2f})" if d.in_domain
        else "OUT OF DOMAIN" + (f" (score {d.score:.2f} &gt; {d.threshold:.2f})"
                                if d.score is not None else " (not scored)")
    )  # fmt: skip
    why = (
        '<ul class="warn">' + "".join(f"<li>{_e(x)}</li>" for x in r.classification.reasons)
        + "</ul><p><b>P(risk) and the FMs frequency below are shown for research only and must "
        "not be used.</b></p>" if r.classification.reasons else ""
    )  # fmt: skip
    return f"""
<h2>Result</h2>
<p class="big">Screening result: <span class="{label}">{_e(label.upper())}</span>
&nbsp; P(risk) = <b>{_prob(r.risk_probability)}</b>
<span class="muted">(risk at P(risk) &ge; {r.classification.threshold:.3f};
P(normal) = {_prob(r.normal_probability)})</span></p>
<p>FMs frequency: <b>{r.fms_frequency:.2f}</b> ({n_fms} of {len(r.clips)} clips with
P(FMs) &gt; {FMS_CLIP_THRESHOLD}) &rarr; FMs category: <b>{_e(r.fms_category)}</b>
<span class="muted">({thresholds})</span></p>
<p>Training domain: {domain}</p>
{why}
<h2>P(FMs) per clip over time</h2>
<img src="{rec.stem}.png" width="900" height="280"
 alt="Per-clip probability of fidgety movements over the recording; top clips highlighted">
<h2>Top FMs clips for review</h2>
<p>{_e(REVIEW_NOTE)}</p>
{top_table}
<h2>Quality and warnings</h2>
{table(quality_rows)}
<h3>Warnings</h3>
{warn}
<h2>Model</h2>
{table(model_rows)}
"""


def _page(rec: _Rec, want_clips: bool) -> bytes:
    row = rec.row
    disclaimer = getattr(rec.result, "disclaimer", None) or DISCLAIMER
    head = (
        '<p><a href="../index.html">&larr; all recordings</a></p>\n'
        f"{_disclaimer(disclaimer)}\n<h1>Recording {_e(row.get('id', ''))}</h1>\n"
        f'<p>File: <span class="path">{_e(row.get("path", ""))}</span></p>'
    )
    if rec.result is not None:
        body = _page_done(rec, want_clips)
    else:
        body = (
            '<h2>Result</h2><p class="big"><span class="failed">NOT SCREENED</span></p>'
            f"<p>Error code: <code>{_e(rec.error_code)}</code></p>"
            f"<p>{_e(rec.error) or 'No message.'}</p>"
        )
    foot = f"\n{_disclaimer(disclaimer)}"
    return _html(f"MAM screening report: {row.get('id', '')}", head + body + foot)


# -- index ----------------------------------------------------------------------------------------
def _index(recs: list[_Rec]) -> bytes:
    done = sum(r.result is not None for r in recs)
    risk = sum(r.result is not None and r.result.classification.label == "risk" for r in recs)
    rows = []
    for i, rec in enumerate(recs, start=1):
        link = f"{REPORTS_DIR}/{rec.stem}.html"
        ident = f'<a href="{link}">{_e(rec.row.get("id", ""))}</a>'
        path = f'<span class="path">{_e(rec.row.get("path", ""))}</span>'
        r = rec.result
        if r is not None:
            label = r.classification.label
            cells = (
                f'<td><span class="{label}">{_e(label)}</span></td>'
                f"<td class=num>{_prob(r.risk_probability)}</td>"
                f"<td class=num>{r.fms_frequency:.2f}</td><td>{_e(r.fms_category)}</td>"
                f"<td class=num>{r.quality.tracked_fraction:.0%}</td><td></td>"
            )
        else:
            cells = (
                '<td><span class="failed">failed</span></td><td></td><td></td><td></td><td></td>'
                f"<td><code>{_e(rec.error_code)}</code><br>{_e(rec.error)}</td>"
            )
        rows.append(
            f"<tr><td class=num>{i}</td><td>{ident}</td><td>{path}</td>{cells}"
            f'<td><a href="{link}">report</a></td></tr>'
        )
    body = (
        f"{_disclaimer()}\n<h1>MAM screening: {len(recs)} recordings</h1>\n"
        f"<p>{done} screened ({risk} classified risk), {len(recs) - done} failed or not "
        "screened. Each report shows per-clip P(FMs), the top FMs clips to review, quality and "
        "warnings.</p>\n"
        "<table><tr><th>#</th><th>ID</th><th>Path</th><th>Classification</th><th>P(risk)</th>"
        "<th>FMs frequency</th><th>FMs category</th><th>Tracked</th><th>Error</th>"
        "<th>Report</th></tr>\n" + "\n".join(rows) + f"\n</table>\n{_disclaimer()}"
    )
    return _html("MAM screening: index", body)


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
