"""MODEL_CARD.md generated from the weights' metadata and ``mam evaluate`` output, so that the
numbers in the card are the numbers that were measured."""

from __future__ import annotations

from mam.model.weights import ModelMeta

ROWS = (
    ("auc", "AUC (risk)"),
    ("pr_auc", "PR-AUC (risk; average precision)"),
    ("accuracy", "accuracy"),
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("ppv", "PPV"),
    ("npv", "NPV"),
    ("ece", "expected calibration error"),
    ("ece_if_calibrated", "the same, were P(risk) perfectly calibrated (median, 95% range)"),
    ("ece_p_value", "share of those draws at least as far off (calibration p-value)"),
    ("fms_frequency_auc", "FMs-frequency AUC, normal vs risk"),
    (
        "fms_frequency_auc_continuous_vs_intermittent",
        "FMs-frequency AUC, continuous vs intermittent",
    ),
    ("median_kappa", "median per-video kappa, FMs clips"),
    ("abstention_rate", "indeterminate (abstained)"),
)
IN_DOMAIN_ROWS = (("auc", "AUC"), ("sensitivity", "sensitivity"), ("specificity", "specificity"),
                  ("ece", "ECE"), ("ece_if_calibrated", "ECE if perfectly calibrated"),
                  ("median_kappa", "median kappa"))  # fmt: skip


def _cell(res: dict, key: str) -> str:
    v = res.get(key)
    if v is None:
        return "n/a"
    sd, ci = res.get(f"{key}_sd"), res.get(f"{key}_ci")
    if sd is not None:
        return f"{v:.3f} +- {sd:.3f}"
    return f"{v:.3f} ({ci[0]:.3f}-{ci[1]:.3f})" if ci else f"{v:.3f}"


def _infants(r: dict) -> str:
    n = r.get("infants", sum(f["infants"] for f in r.get("folds", [])))
    k = r.get("risk_infants", sum(f["risk_infants"] for f in r.get("folds", [])))
    return f"{n} ({k})"


def _table(evaluations: dict[str, dict], rows, pick=lambda r: r) -> list[str]:
    out = ["| metric | " + " | ".join(evaluations) + " |", "|---|" + "---|" * len(evaluations)]
    for key, label in rows:
        out.append(f"| {label} | " + " | ".join(_cell(pick(r), key) for r in evaluations.values())
                   + " |")  # fmt: skip
    out.append("| infants (risk) | " + " | ".join(_infants(pick(r)) for r in evaluations.values())
               + " |")  # fmt: skip
    return out


ECE_TARGET = 0.05  # issue 14's bound; a card says where it is not met


def render(
    meta: ModelMeta,
    evaluations: dict[str, dict],
    simulated: bool = True,
    representations: dict[str, dict] | None = None,
    domain: dict[str, dict] | None = None,
) -> str:
    """``evaluations``: column title -> result of ``evaluate``/``cross_validate``;
    ``representations``: pose representation -> external metrics (``bench/demo_weights.py
    compare``); ``domain``: set of recordings -> share flagged (``... domain``)."""
    cfg = meta.provenance.get("train_config", {})
    cal = meta.provenance.get("calibration", {})
    dom = meta.provenance.get("domain", {})
    th = meta.fms_category_thresholds
    data = meta.provenance.get("data", "?")
    data = ", ".join(f"`{d}`" for d in data) if isinstance(data, list) else f"`{data}`"
    lines = [
        f"# Model card: `{meta.name}` {meta.version}",
        "",
        "**Demonstration weights trained on SIMULATED infants. Not for clinical use.**"
        if simulated
        else "**Decision support only, not a diagnosis.**",
        "",
        "## Intended use",
        "Demonstrating and testing the screening pipeline end to end. Every output is decision "
        "support to be reviewed by a qualified GMA assessor, never a diagnosis. A recording "
        "unlike the training data (below) is answered `indeterminate`, with the reason.",
        "",
        "## Model",
        f"MAM (Gao, Yao et al., Nat. Commun. 2023); configuration `{meta.config.to_dict()}`; "
        f"pose representation `{meta.representation}` (mam.pose.representation).",
        "",
        "## Training data and procedure",
        f"- {meta.provenance.get('summary', '')}; data: {data} "
        f"({meta.provenance.get('infants', '?')} infants; recipe "
        f"`{meta.provenance.get('recipe', 'mam train')}`).",
        f"- Epochs {cfg.get('epochs')}, optimiser {cfg.get('optimizer')}, lr {cfg.get('lr')} to "
        f"{cfg.get('max_lr')} (CyclicLR), triplet margin {cfg.get('triplet_margin')}, reference "
        f"branch {cfg.get('use_reference')}, closeness loss {cfg.get('use_closeness')}, seed "
        f"{cfg.get('seed')}. Every hyper-parameter: `provenance.train_config` in the weights JSON.",
        f"- Calibration: {cal.get('method', 'none')} ({cal.get('infants', 0)} held-out infants, "
        f"{cal.get('risk_infants', 0)} at risk); risk threshold (Youden) "
        f"{meta.risk_threshold:.3f}.",
        f"- FMs frequency (share of clips with P(FMs) > {meta.fms_clip_threshold}): continuous "
        f">= {th.get('continuous', float('nan')):.3f}, intermittent >= "
        f"{th.get('intermittent', float('nan')):.3f}, sporadic >= "
        f"{th.get('sporadic', float('nan')):.3g}, else absent.",
    ]
    for kind, kc in meta.calibration_by_kind.items():
        lines.append(
            f"- Calibration of `{kind}` sources, its own: {kc.calibration.method} on "
            f"{kc.infants} held-out infants of that kind; risk threshold (Youden) "
            f"{kc.risk_threshold:.3f}. Other sources use the overall calibration above."
        )
    if dom:
        flagged = ", ".join(f"{k} {v:.1%} of {dom['heldout'][k]}"
                            for k, v in dom["heldout_flagged"].items())  # fmt: skip
        lines.append(f"- Domain check: {dom.get('method')}; held-out infants flagged: {flagged}.")
    lines += [
        "",
        "## Evaluation",
        "Measured with `mam evaluate` (risk is the positive class; 95% bootstrap intervals over "
        "infants in brackets; mean +- sd over folds where cross-validated). All infants, "
        "whatever the model said:",
        "",
        *_table(evaluations, ROWS),
        "",
        "The part the model speaks for (results not indeterminate):",
        "",
        *_table(evaluations, IN_DOMAIN_ROWS, lambda r: r.get("in_domain", {})),
    ]
    if representations:
        lines += [
            "",
            "## Which pose representation feeds the model",
            "One model per representation, same data and seed, external rendered set through "
            "the default pose backend (`python bench/demo_weights.py compare`; the run that "
            "chose the representation, before any later recalibration):",
            "",
            "| representation | AUC | median kappa | ECE | abstained | external infants |",
            "|---|---|---|---|---|---|",
        ]
        for rep, r in representations.items():
            cells = [_cell(r, k) for k in ("auc", "median_kappa", "ece", "abstention_rate")]
            cells.append(str(r.get("infants", "?")))
            lines.append(f"| `{rep}`{' (shipped)' if rep == meta.representation else ''} | "
                         + " | ".join(cells) + " |")  # fmt: skip
    if domain:
        lines += [
            "",
            "## Domain check",
            "Share of recordings flagged out of domain, by each component and by both "
            "(`python bench/demo_weights.py domain`):",
            "",
            "| recordings | motion statistics | clip embedding | both (shipped) |",
            "|---|---|---|---|",
        ]
        for name, r in domain.items():
            lines.append(f"| {name} | {r['motion']:.0%} | {r['embedding']:.0%} | "
                         f"{r['both']:.0%} |")  # fmt: skip
    lines += [
        "",
        "## Known limits",
        "- Trained and evaluated on simulated movement (real infant motion as background, "
        "simulated general movements and FMs on top): these numbers say the procedure works, not "
        "that the model recognises real fidgety movements. Real motion without the simulated "
        "component is outside its domain and answered `indeterminate`.",
        "- The pose model (BlazePose) is trained on adults; infants are tracked less well and "
        "depth barely follows small movements (DESIGN.md).",
        "- The compact configuration and velocity input differ from the paper's model; see the "
        "configuration above.",
    ]
    for t, r in evaluations.items():
        e, floor, pv = r.get("ece"), r.get("ece_if_calibrated"), r.get("ece_p_value")
        if e is None or e <= ECE_TARGET:
            continue
        if floor is not None and pv is not None and pv >= 0.05:
            lines.append(
                f"- {t}: the calibration error {e:.3f} is above the {ECE_TARGET} target, but on "
                f"{r.get('infants')} infants a perfectly calibrated P(risk) would show {floor:.3f} "
                f"(median; p = {pv:.2f}): the data cannot tell this from perfect calibration, and "
                f"cannot verify the target either."
            )
        else:
            lines.append(
                f"- {t}: P(risk) is less well calibrated than the {ECE_TARGET} target (error "
                f"{e:.3f}{'' if pv is None else f', p = {pv:.2f}'}). Read it as a ranking score "
                "more than as a frequency."
            )
    lines.append("")
    return "\n".join(lines)
