"""HTML reports of a batch (``mam.batch.report``); review clips with the skeleton
(``mam.batch.review_clips``).

Rows come from a real ledger (``mam.batch.Ledger``) holding real screening results of simulated
poses; the clip test cuts the shipped demo recording.
"""

from __future__ import annotations

import html
import itertools
import re
import struct
import time
from pathlib import Path

import av
import numpy as np
import pytest

from mam import DISCLAIMER
from mam.batch import Item, Ledger
from mam.batch.report import CLIPS_DIR, REPORTS_DIR, mmss, write_reports
from mam.batch.review_clips import LEFT_RGB
from mam.pose.precomputed import validate_pose_array
from mam.screening import Screener
from mam.synth.motion import simulate_infant
from mam.video import iter_frames

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "demo" / "infant_demo.mp4"
EVIL_ID = "<script>alert(1)</script>"
EVIL_PATH = 'ward "B"/<img src=x onerror=alert(2)>.npy'
ESCAPED_DISCLAIMER = html.escape(DISCLAIMER, quote=True)


@pytest.fixture(scope="module")
def results() -> list[str]:
    """Genuine ScreeningResult JSON of simulated 60 s recordings (FMs present / absent)."""
    screener = Screener()
    out = []
    for seed, category in ((11, "continuous"), (12, "absent")):
        sim = simulate_infant(np.random.default_rng(seed), f"s{seed}", category, 60.0)
        out.append(screener.screen_pose(validate_pose_array(sim.joints)).model_dump_json())
    return out


def _ledger_rows(tmp: Path, entries: list[tuple[str, str, str, str | None, str | None]]) -> list:
    """Rows as the batch runner reads them: ``(path, id, status, code or result, message)``."""
    tmp.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(tmp / "ledger.sqlite")
    try:
        for n, (path, ident, status, payload, message) in enumerate(entries):
            key = f"{n:064x}"
            ledger.set_path(Item(tmp / path, path, ident), key, key, 1, 1)
            if status == "done":
                ledger.finish(key, key, "pose", "done", result=payload)
            elif status == "failed":
                ledger.finish(key, key, "video", "failed", payload, message)
            # else: never finished (killed before its turn)
        return ledger.rows()
    finally:
        ledger.close()


@pytest.fixture
def rows(tmp_path, results) -> list[dict]:
    return _ledger_rows(
        tmp_path,
        [
            ("2021/Smith_Jane_12w.npy", "Smith-Jane", "done", results[0], None),
            (EVIL_PATH, EVIL_ID, "done", results[1], None),
            (
                "Doe_John.mp4",
                "Doe-John",
                "failed",
                "not_a_video",
                "Doe_John.mp4: <b>not</b> a video",
            ),
            ("Roe_Richard.mp4", "Roe-Richard", "pending", None, None),
        ],
    )


def _links(page: Path) -> list[str]:
    text = page.read_text()
    return re.findall(r'(?:href|src)="([^"]+)"', text)


def _pages(out: Path, rows: list[dict]) -> dict[str, Path]:
    """Each row's page, by id, as the index links them (in row order)."""
    links = dict.fromkeys(re.findall(r'href="(reports/[^"]+)"', (out / "index.html").read_text()))
    assert len(links) == len(rows)
    return {r["id"]: out / link for r, link in zip(rows, links)}


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


def test_pages_index_links_pictures_and_disclaimer(tmp_path, rows, results):
    out = tmp_path / "out"
    index = write_reports(out, rows)
    assert index == out / "index.html"
    text = index.read_text()
    assert ESCAPED_DISCLAIMER in text
    pages = [p for p in _links(index) if p.endswith(".html")]
    assert len(set(pages)) == len(rows) == 4
    for link in _links(index):
        assert (out / link).is_file(), link

    by_id = _pages(out, rows)
    for page in by_id.values():
        body = page.read_text()
        # Prominent: at the top and at the bottom of every page.
        assert body.count(ESCAPED_DISCLAIMER) == 2
        for link in _links(page):
            assert not link.startswith(("http:", "https:", "/", "//")), link
            assert (page.parent / link).resolve().is_file(), link

    from mam.schemas import ScreeningResult

    done = ScreeningResult.model_validate_json(results[0])
    page = by_id["Smith-Jane"].read_text()
    assert done.classification.label.upper() in page
    assert f"{done.classification.threshold:.3f}" in page
    assert done.fms_category in page and f"{done.fms_frequency:.2f}" in page
    assert "11%" in page
    for clip in done.top_fms_clips:  # review times, mm:ss
        assert f"{mmss(clip.start_s)}&ndash;{mmss(clip.end_s, up=True)}" in page
    assert re.fullmatch(r"\d\d:\d\d", mmss(done.top_fms_clips[0].start_s))
    pngs = [by_id["Smith-Jane"].parent / link for link in _links(by_id["Smith-Jane"])]
    pngs = [p for p in pngs if p.suffix == ".png"]
    assert len(pngs) == 1 and _png_size(pngs[0]) == (900, 280)
    assert "onnxruntime" in page and "mam_demo" in page
    for w in done.warnings:
        assert html.escape(w, quote=True) in page

    # Failed and never-finished rows: the code and the (escaped) message, on the index too.
    failed = by_id["Doe-John"].read_text()
    assert "not_a_video" in failed and "&lt;b&gt;not&lt;/b&gt; a video" in failed
    assert "not_a_video" in text and "&lt;b&gt;not&lt;/b&gt; a video" in text
    assert "not_screened" in by_id["Roe-Richard"].read_text() and "not_screened" in text
    assert not list((out / REPORTS_DIR).glob("*.tmp"))


def test_data_is_escaped_and_never_in_file_names(tmp_path, rows):
    out = tmp_path / "out"
    write_reports(out, rows)
    html_files = [out / "index.html", *(out / REPORTS_DIR).glob("*.html")]
    for f in html_files:
        body = f.read_text()
        assert "<script" not in body and "<img src=x" not in body, f.name
        assert "http://" not in body and "https://" not in body, f.name
    index = (out / "index.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in index
    assert "&lt;img src=x onerror=alert(2)&gt;" in index and "&quot;B&quot;" in index
    words = ("Smith", "Jane", "Doe", "John", "Roe", "script", "alert", "img", "ward")
    for f in (out / REPORTS_DIR).rglob("*"):
        assert not any(w.lower() in f.name.lower() for w in words), f.name
        assert re.fullmatch(r"rec-[0-9a-f]{16}\.(html|png)", f.name), f.name


def test_rerun_overwrites_identically_and_is_fast(tmp_path, rows, results):
    out = tmp_path / "out"
    write_reports(out, rows)
    first = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    (out / "index.html").write_text("stale")
    write_reports(out, rows)
    second = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert second == first

    # Per page, well under the 0.5 s budget (a recording takes ~30 s to screen).
    many = _ledger_rows(
        tmp_path / "many",
        [(f"r{i}.npy", f"r{i}", "done", results[i % 2], None) for i in range(12)],
    )
    t = time.perf_counter()
    write_reports(tmp_path / "many_out", many)
    per_page = (time.perf_counter() - t) / len(many)
    assert per_page < 0.5, per_page


@pytest.mark.skipif(not DEMO.is_file(), reason="demo recording missing")
def test_review_clips_with_skeleton_on_the_demo(tmp_path, results):
    from mam.schemas import ScreeningResult

    done = ScreeningResult.model_validate_json(results[0])
    assert all(c.end_s <= 60.0 for c in done.top_fms_clips)  # inside the 60 s demo
    not_video = tmp_path / "broken.mp4"
    not_video.write_text("not a video")
    rows = _ledger_rows(
        tmp_path,
        [
            ("demo.mp4", "demo", "done", results[0], None),
            ("pose_only.npy", "pose", "done", results[1], None),
            ("broken.mp4", "broken", "done", results[1], None),
        ],
    )
    videos = {"demo": DEMO, "broken": not_video}
    out = tmp_path / "out"
    t = time.perf_counter()
    write_reports(out, rows, recording_of=lambda r: videos.get(r["id"]), clips=True)
    elapsed = time.perf_counter() - t

    pages = _pages(out, rows)
    demo_page = pages["demo"].read_text()
    srcs = re.findall(r'<video[^>]* src="([^"]+)"', demo_page)
    assert len(srcs) == len(done.top_fms_clips) == 3
    clips = [pages["demo"].parent / s for s in srcs]
    assert all(c.parent.name == CLIPS_DIR and c.is_file() for c in clips)
    # A clip that cannot be cut is a note, not a failed report; a pose file has no video.
    assert "could not be cut" in pages["broken"].read_text()
    assert "not_a_video" in pages["broken"].read_text()
    assert "no video for this recording" in pages["pose"].read_text()

    top = done.top_fms_clips[0]
    with av.open(str(clips[0])) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and max(s.width, s.height) <= 640
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
        duration = c.duration / 1e6
    expected = top.end_s - top.start_s  # 9.6 s: 240 frames at 25 fps
    assert abs(len(frames) - expected * 25) <= 2 and abs(duration - expected) <= 0.08

    # The skeleton is really drawn: mid-clip, the clip differs strongly from the source frame
    # (beyond compression noise) and carries the left-limb colour, which the source lacks.
    j = len(frames) // 2
    k = round(top.start_s * 25) + j
    source = next(itertools.islice(iter_frames(DEMO, max_side=640), k, None))
    drawn = frames[j]
    assert drawn.shape == source.shape
    body = slice(drawn.shape[0] // 8, None)  # below the time caption
    diff = np.abs(drawn.astype(int) - source.astype(int)).sum(axis=2)[body]
    assert (diff > 150).sum() > 300

    def left_coloured(img: np.ndarray) -> int:
        d = np.abs(img[body].astype(int) - np.array(LEFT_RGB)).max(axis=2)
        return int((d < 70).sum())

    assert left_coloured(drawn) > left_coloured(source) + 50

    # A rerun reuses the cut clips (content-addressed names) and rewrites the pages.
    mtimes = [c.stat().st_mtime_ns for c in clips]
    t = time.perf_counter()
    write_reports(out, rows, recording_of=lambda r: videos.get(r["id"]), clips=True)
    assert time.perf_counter() - t < elapsed / 3
    assert [c.stat().st_mtime_ns for c in clips] == mtimes
    assert re.findall(r'<video[^>]* src="([^"]+)"', pages["demo"].read_text()) == srcs
