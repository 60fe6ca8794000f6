"""The reviewer against the model, per recording, as in the paper's Fig. 3b.

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
