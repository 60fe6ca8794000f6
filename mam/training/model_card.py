"""MODEL_CARD.md generated from the weights' metadata and ``mam evaluate`` output, so that the
numbers in the card are the numbers that were measured."""

from __future__ import annotations

from mam.model.weights import ModelMeta

ROWS = (
    ("auc", "AUC (risk)"),
    ("accuracy", "accuracy"),
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("ppv", "PPV"),
    ("npv", "NPV"),
    ("ece", "expected calibration error"),
    ("fms_frequency_auc", "FMs-frequency AUC, normal vs risk"),
    (
        "fms_frequency_auc_continuous_vs_intermittent",
        "FMs-frequency AUC, continuous vs intermittent",
    ),
    ("median_kappa", "median per-video kappa, FMs clips"),
)


def _cell(res: dict, key: str) -> str:
    v = res.get(key)
    if v is None:
        return "n/a"
    sd = res.get(f"{key}_sd")
    return f"{v:.3f} +- {sd:.3f}" if sd is not None else f"{v:.3f}"


def render(meta: ModelMeta, evaluations: dict[str, dict], simulated: bool = True) -> str:
    """``evaluations``: column title -> result of ``evaluate``/``cross_validate``."""
    cfg = meta.provenance.get("train_config", {})
    cal = meta.provenance.get("calibration", {})
    th = meta.fms_category_thresholds
    head = "| metric | " + " | ".join(evaluations) + " |"
    lines = [
        f"# Model card: `{meta.name}` {meta.version}",
        "",
        "**Demonstration weights trained on SIMULATED infants. Not for clinical use.**"
        if simulated
        else "**Decision support only, not a diagnosis.**",
        "",
        "## Intended use",
        "Demonstrating and testing the screening pipeline end to end. Every output is decision "
        "support to be reviewed by a qualified GMA assessor, never a diagnosis.",
        "",
        "## Model",
        f"MAM (Gao, Yao et al., Nat. Commun. 2023); configuration `{meta.config.to_dict()}`.",
        "",
        "## Training data and procedure",
        f"- {meta.provenance.get('summary', '')}; data: `{meta.provenance.get('data', '?')}`, "
        f"{meta.provenance.get('infants', '?')} infants.",
        f"- Epochs {cfg.get('epochs')}, optimiser {cfg.get('optimizer')}, lr {cfg.get('lr')} to "
        f"{cfg.get('max_lr')} (CyclicLR), triplet margin {cfg.get('triplet_margin')}, reference "
        f"branch {cfg.get('use_reference')}, closeness loss {cfg.get('use_closeness')}, seed "
        f"{cfg.get('seed')}. Every hyper-parameter: `provenance.train_config` in the weights JSON.",
        f"- Calibration: {cal.get('method', 'none')} ({cal.get('infants', 0)} held-out infants, "
        f"{cal.get('risk_infants', 0)} at risk); risk threshold (Youden) "
        f"{meta.risk_threshold:.3f}.",
        f"- FMs frequency (share of clips with P(FMs) > {meta.fms_clip_threshold}): continuous "
        f">= {th.get('continuous', float('nan')):.3f}, intermittent >= "
        f"{th.get('intermittent', float('nan')):.3f}, else sporadic or absent.",
        "",
        "## Evaluation",
        "Measured with `mam evaluate` (risk is the positive class; mean +- sd over folds where "
        "cross-validated):",
        "",
        head,
        "|---|" + "---|" * len(evaluations),
    ]
    for key, label in ROWS:
        lines.append(
            f"| {label} | " + " | ".join(_cell(r, key) for r in evaluations.values()) + " |"
        )
    lines.append(
        "| infants (risk) | "
        + " | ".join(
            f"{r.get('infants', sum(f['infants'] for f in r.get('folds', [])))} "
            f"({r.get('risk_infants', sum(f['risk_infants'] for f in r.get('folds', [])))})"
            for r in evaluations.values()
        )
        + " |"
    )
    lines += [
        "",
        "## Known limits",
        "- Trained and evaluated on simulated motion (`mam synth`), which is easier than real "
        "recordings: these numbers say the procedure works, not that the model does.",
        "- The pose model (MediaPipe BlazePose) is trained on adults; infants are tracked less "
        "well and depth barely follows small movements (DESIGN.md).",
        "- The compact configuration and velocity input differ from the paper's model; see the "
        "configuration above.",
        "",
    ]
    return "\n".join(lines)
