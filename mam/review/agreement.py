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
