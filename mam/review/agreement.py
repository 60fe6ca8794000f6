"""Agreement per recording as in the paper's Fig. 3b: the (signed-off) reviewer against the
model, and the independent assessors against each other and against the model.

Cohen's kappa between the model's FMs clips (P(FMs) > 0.5, the FMs frequency's definition) and
the reviewer's: a clip is an FMs clip for the reviewer when more than half of it is covered by
the FMs intervals they marked. That is ``mam evaluate``'s rule (:mod:`mam.training.evaluate`,
which follows the paper's expert annotation), applied to the clips the batch run scored, so the
two reports agree. Both labellings constant: kappa is undefined; 1 when they agree, else 0
(again as ``mam evaluate``). Beside it, the reviewer's explicit per-clip verdicts and whether
their category and group match the model's.
"""

from __future__ import annotations

import numpy as np

from mam.features import intervals_to_mask
from mam.gma import clip_fms_labels, clip_kappa
from mam.skeleton import FPS


def clip_labels(intervals, clips, num_frames: int) -> tuple[list[bool], list[bool]]:
    """``(reviewer, model)`` FMs label per clip (``mam.gma.clip_fms_labels``)."""
    mask = intervals_to_mask([(i["start_s"], i["end_s"]) for i in intervals], num_frames)
    return clip_fms_labels(mask, clips)


def agreement_row(ident: str, result, annotation: dict) -> dict:
    """One recording's line of the agreement report."""
    fields = {k: v["value"] for k, v in annotation["fields"].items()}
    clips = result.clips
    n_frames = max(result.quality.frames_total, max((round(c.end_s * FPS) for c in clips),
                                                    default=0))  # fmt: skip
    rev, mod = clip_labels(annotation["intervals"], clips, n_frames)
    verdicts = [v for k, v in fields.items() if k.startswith("clip:") and v]
    label = result.classification.label
    category, group = fields.get("category"), fields.get("group")
    return {
        "id": ident,
        "clips": len(clips),
        "reviewer_fms_clips": int(sum(rev)),
        "model_fms_clips": int(sum(mod)),
        "clip_agreement": round(float(np.mean(np.equal(rev, mod))), 4) if clips else None,
        "kappa": round(clip_kappa(rev, mod), 4) if clips else None,
        "verdicts": len(verdicts),
        "verdicts_agree": sum(v == "agree" for v in verdicts),
        "reviewer_category": category,
        "model_category": result.fms_category,
        "reviewer_group": group,
        "model_label": label,
        "model_usable": result.probabilities_usable,
        "category_agrees": None if label == "indeterminate" else category == result.fms_category,
        "group_agrees": None if label == "indeterminate" else group == label,
    }


def summarise(rows: list[dict]) -> dict:
    kappas = [r["kappa"] for r in rows if r["kappa"] is not None]
    usable = [r for r in rows if r["group_agrees"] is not None]
    return {
        "recordings": len(rows),
        "median_kappa": float(np.median(kappas)) if kappas else None,
        "kappa_recordings": len(kappas),
        "group_agreement": (
            float(np.mean([r["group_agrees"] for r in usable])) if usable else None
        ),
        "category_agreement": (
            float(np.mean([r["category_agrees"] for r in usable])) if usable else None
        ),
        "indeterminate": sum(r["model_label"] == "indeterminate" for r in rows),
        "rule": "9.6 s clips as scored; reviewer FMs clip = more than half covered by the "
        "reviewer's FMs intervals; model FMs clip = P(FMs) > 0.5 (paper Fig. 3b; mam evaluate)",
    }


# -- between assessors -------------------------------------------------------------------------
def _n_frames(result) -> int:
    return max(result.quality.frames_total,
               max((round(c.end_s * FPS) for c in result.clips), default=0))  # fmt: skip


def _labels(intervals, result) -> list[bool]:
    return clip_labels(intervals, result.clips, _n_frames(result))[0]


def _verdict(annotation: dict) -> tuple:
    f = annotation["fields"]
    return (f.get("category", {}).get("value"), f.get("group", {}).get("value"))


def assessors_agreement(ident: str, result, reviews: dict[str, dict]) -> dict:
    """Agreement among the finished reviews of one recording (``{assessor: annotation}``):
    ``pairs`` (each pair of assessors: clip kappa, category and group agreement) and ``model``
    (each assessor against the model: clip kappa, category and group agreement; the model's
    category and group count only where it can speak, as in :func:`agreement_row`)."""
    label = result.classification.label
    model_labels = [c.fms_probability > 0.5 for c in result.clips]
    names = sorted(reviews)
    labels = {n: _labels(reviews[n]["intervals"], result) for n in names}
    verdicts = {n: _verdict(reviews[n]) for n in names}
    pairs, model = [], []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            pairs.append({
                "id": ident, "assessor_a": a, "assessor_b": b, "clips": len(result.clips),
                "kappa": round(clip_kappa(labels[a], labels[b]), 4) if result.clips else None,
                "category_a": verdicts[a][0], "category_b": verdicts[b][0],
                "category_agrees": verdicts[a][0] == verdicts[b][0],
                "group_agrees": verdicts[a][1] == verdicts[b][1],
            })  # fmt: skip
        usable = label != "indeterminate"
        model.append({
            "id": ident, "assessor": a, "clips": len(result.clips),
            "kappa": round(clip_kappa(labels[a], model_labels), 4) if result.clips else None,
            "category": verdicts[a][0], "model_category": result.fms_category,
            "category_agrees": verdicts[a][0] == result.fms_category if usable else None,
            "group_agrees": verdicts[a][1] == label if usable else None,
        })  # fmt: skip
    return {"pairs": pairs, "model": model}


def _median(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(float(np.median(xs)), 4) if xs else None


def _rate(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(float(np.mean(xs)), 4) if xs else None


def summarise_assessors(pairs: list[dict], model: list[dict]) -> dict:
    """The inter-assessor and assessor-model figures of many recordings."""
    return {
        "inter_assessor": {
            "pairs": len(pairs),
            "recordings": len({p["id"] for p in pairs}),
            "median_kappa": _median(p["kappa"] for p in pairs),
            "category_agreement": _rate(p["category_agrees"] for p in pairs),
            "group_agreement": _rate(p["group_agrees"] for p in pairs),
        },
        "assessor_model": {
            "reviews": len(model),
            "median_kappa": _median(m["kappa"] for m in model),
            "category_agreement": _rate(m["category_agrees"] for m in model),
            "group_agreement": _rate(m["group_agrees"] for m in model),
        },
        "assessor_rule": "finished assessors' reviews; FMs clip = more than half covered by the "
        "assessor's FMs intervals; model FMs clip = P(FMs) > 0.5 (paper Fig. 3b)",
    }


# -- live agreement (the service's /metrics) ----------------------------------------------------
CLINICIAN_GROUPS = ("risk", "normal", "no_group", "split")
MODEL_LABELS = ("risk", "normal", "indeterminate")


def clinicians_verdicts(recordings, store) -> list[dict]:
    """The finished clinicians' verdict of each screened recording, against the model's result.

    The verdict is the senior's signed-off one where there is one; else the assessors' reviews
    marked done, when they all give the same group (``split`` when they do not: the sign-off
    settles it; ``no_group`` for abnormal FMs or not assessable). Per row: ``at`` (when the
    verdict was finished: the sign-off, else the last assessor's done), ``kind`` (the result's
    domain kind), ``digest`` (the model's), ``clinician`` (one of :data:`CLINICIAN_GROUPS`),
    ``model`` (the model's label) and ``kappas`` (clip kappa of each review counted: the
    signed-off one, else every done assessor's; as :func:`agreement_row`). No identifiers.

    Args:
        recordings: :class:`mam.review.catalog.Recording` objects (the catalog's).
        store: the :class:`mam.review.store.ReviewStore`.
    """
    from mam.review.store import FINAL, SIGNED_OFF

    touched = store.summaries()
    rows = []
    for rec in recordings:
        owners = touched.get(rec.rid, {}).get("reviews", {})
        final = owners.get(FINAL, {}).get("state") == SIGNED_OFF
        done = [o for o, r in owners.items() if o != FINAL and r.get("state") == "done"]
        if rec.status != "done" or not (final or done):
            continue
        result = rec.result()
        if result is None:
            continue
        reviews = store.reviews(rec.rid)
        if final:
            counted = {FINAL: reviews[FINAL]}
            kappas = [agreement_row(rec.id, result, reviews[FINAL])["kappa"]]
        else:
            counted = {o: reviews[o] for o in done if o in reviews}
            kappas = [m["kappa"] for m in assessors_agreement(rec.id, result, counted)["model"]]
        groups = {_verdict(r)[1] for r in counted.values()}
        at = max(r["fields"].get("state", {}).get("at", 0.0) for r in counted.values())
        clinician = "split" if len(groups) > 1 else (groups.pop() or "no_group")
        rows.append({
            "at": float(at), "kind": result.domain.kind, "digest": result.model.digest,
            "clinician": clinician, "model": result.classification.label,
            "kappas": [k for k in kappas if k is not None],
        })  # fmt: skip
    return rows


def live_agreement(rows: list[dict]) -> dict[str, dict]:
    """Per kind, the figures of :func:`clinicians_verdicts` rows (already cut to a window):
    ``verdicts`` (``(clinician, model) -> recordings``), ``sensitivity`` and ``specificity`` of
    the model's label against the clinicians' group with the recordings behind each
    (``*_recordings``; indeterminate results are counted in ``verdicts`` only, never as a
    disagreement; None when there are none), and the median clip kappa with its reviews."""
    out: dict[str, dict] = {}
    for r in rows:
        k = out.setdefault(r["kind"], {"verdicts": {}, "kappas": []})
        key = (r["clinician"], r["model"])
        k["verdicts"][key] = k["verdicts"].get(key, 0) + 1
        k["kappas"] += r["kappas"]
    for k in out.values():
        v = k["verdicts"]
        for measure, group, hit in (("sensitivity", "risk", "risk"),
                                    ("specificity", "normal", "normal")):  # fmt: skip
            n = v.get((group, "risk"), 0) + v.get((group, "normal"), 0)
            k[measure] = v.get((group, hit), 0) / n if n else None
            k[measure + "_recordings"] = n
        kappas = k.pop("kappas")
        k["clip_kappa"] = float(np.median(kappas)) if kappas else None
        k["clip_kappa_reviews"] = len(kappas)
    return out
