"""MODEL_CARD.md generated from the weights' metadata and ``mam evaluate`` output, so that the
numbers in the card are the numbers that were measured."""

from __future__ import annotations

import json
from pathlib import Path

from mam.errors import InputError
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


ECE_TARGET = 0.05  # the calibration error a shippable model must reach; a card says where not
CARD_INFO_KEYS = {
    "site": "who trained and validated the weights",
    "intended_use": "what the weights are for, and for whom",
    "population": "the infants they were trained and validated on",
    "contacts": "who to ask (a string or a list)",
    "limitations": "known limits the site adds (a string or a list)",
}
DEMO_USE = (
    "Demonstrating and testing the screening pipeline end to end. Every output is decision "
    "support to be reviewed by a qualified GMA assessor, never a diagnosis. A recording "
    "unlike the training data (below) is answered `indeterminate`, with the reason."
)
SITE_USE = (
    "Every output is decision support to be reviewed by a qualified GMA assessor, never a "
    "diagnosis. A recording unlike the training data (below) is answered `indeterminate`, "
    "with the reason."
)
DEMO_BANNER = "**Demonstration weights trained on SIMULATED infants. Not for clinical use.**"
NOT_STATED = "Not stated by the site (give it in `--card-info`)."


class CardInfoError(InputError):
    """The site file of ``--card-info`` is not a JSON object of the documented keys."""

    code = "invalid_card_info"


def load_card_info(path: str | Path) -> dict:
    """The site's own words for the card (``--card-info FILE``, a JSON object): keys
    ``CARD_INFO_KEYS``, each a string (``contacts``, ``limitations``: or a list of strings)."""
    path = Path(path)
    try:
        info = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise CardInfoError(f"--card-info {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CardInfoError(f"--card-info {path}: not readable JSON ({e})") from None
    if not isinstance(info, dict):
        raise CardInfoError(
            f"--card-info {path}: a JSON object is needed, e.g. "
            '{"intended_use": "...", "population": "...", "contacts": ["..."]}'
        )
    unknown = sorted(set(info) - set(CARD_INFO_KEYS))
    if unknown:
        raise CardInfoError(
            f"--card-info {path}: unknown keys {', '.join(unknown)} "
            f"(known: {', '.join(CARD_INFO_KEYS)})"
        )
    for k, v in info.items():
        listed = k in ("contacts", "limitations")
        if not (isinstance(v, str) or (listed and isinstance(v, list)
                                       and all(isinstance(x, str) for x in v))):  # fmt: skip
            raise CardInfoError(
                f"--card-info {path}: {k} must be text" + (" or a list of texts" if listed else "")
            )
    return info


def declared_data(provenance: dict) -> tuple[str, dict | None]:
    """What the weights' infants were, from the weights' own provenance: ``simulated``,
    ``recordings``, ``mixed`` or ``unknown``, with the declared counts. Weights from before
    ``data_declared`` was recorded (the shipped demo weights) are judged by what their
    provenance says."""
    d = provenance.get("data_declared")
    if isinstance(d, dict):
        sim, rec = int(d.get("simulated") or 0), int(d.get("recordings") or 0)
        kind = ("mixed" if sim and rec else "simulated" if sim
                else "recordings" if rec else "unknown")  # fmt: skip
        return kind, {"simulated": sim, "recordings": rec}
    said = f"{provenance.get('summary', '')} {provenance.get('recipe', '')}".lower()
    return ("simulated" if "simulated" in said or "synth" in said else "unknown"), None


def _listed(v) -> list[str]:
    return [v] if isinstance(v, str) else list(v or [])


def _declared_line(kind: str, counts: dict | None) -> str | None:
    if counts is None:
        return None if kind == "simulated" else (
            "- The weights do not record what their infants were (site recordings or not)."
        )  # fmt: skip
    parts = [f"{counts['recordings']} recordings"] if counts["recordings"] else []
    parts += [f"{counts['simulated']} SIMULATED infants"] if counts["simulated"] else []
    return f"- Declared data: {' and '.join(parts) or 'none declared'} (`dataset.json`)."


def _model_section(config: dict, representation: str) -> list[str]:
    return [
        "## Model",
        f"MAM (Gao, Yao et al., Nat. Commun. 2023); configuration `{config}`; "
        f"pose representation `{representation}` (mam.pose.representation).",
        "",
    ]


def _procedure(cfg: dict) -> str:
    return (
        f"- Epochs {cfg.get('epochs')}, optimiser {cfg.get('optimizer')}, lr {cfg.get('lr')} to "
        f"{cfg.get('max_lr')} (CyclicLR), triplet margin {cfg.get('triplet_margin')}, reference "
        f"branch {cfg.get('use_reference')}, closeness loss {cfg.get('use_closeness')}, seed "
        f"{cfg.get('seed')}."
    )


def _weights_section(meta: ModelMeta) -> list[str]:
    """Model, training data and procedure of one set of weights, from their metadata."""
    cfg = meta.provenance.get("train_config", {})
    cal = meta.provenance.get("calibration", {})
    dom = meta.provenance.get("domain", {})
    th = meta.fms_category_thresholds
    data = meta.provenance.get("data", "?")
    data = ", ".join(f"`{d}`" for d in data) if isinstance(data, list) else f"`{data}`"
    lines = [
        *_model_section(meta.config.to_dict(), meta.representation),
        "## Training data and procedure",
        f"- {meta.provenance.get('summary', '')}; data: {data} "
        f"({meta.provenance.get('infants', '?')} infants; recipe "
        f"`{meta.provenance.get('recipe', 'mam train')}`).",
        _procedure(cfg) + " Every hyper-parameter: `provenance.train_config` in the weights JSON.",
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
    return lines


def _recipe_section(recipe: dict) -> list[str]:
    """Model and procedure of a cross-validated recipe: k sets of weights, none shipped."""
    cfg = recipe.get("train_config", {})
    k, n = recipe["k"], recipe.get("infants", "?")
    return [
        *_model_section(cfg.get("model", {}), cfg.get("representation", "?")),
        "## Training data and procedure",
        f"- Cross-validation of the `mam train` recipe: {k} stratified folds of {n} infants "
        f"({recipe.get('risk_infants', '?')} at risk); each fold's weights are trained and "
        f"calibrated (a share of {recipe.get('calibration_fraction')} held out for the "
        "calibration, the risk threshold by Youden and the FMs-frequency cut-offs) on the other "
        "folds and evaluated on it. The numbers describe the recipe on these data, not one set "
        "of weights.",
        _procedure(cfg) + " Every hyper-parameter: `recipe.train_config` in `mam evaluate`'s "
        "JSON output.",
    ]


def render(
    meta: ModelMeta | None,
    evaluations: dict[str, dict],
    simulated: bool | None = None,
    representations: dict[str, dict] | None = None,
    domain: dict[str, dict] | None = None,
    card_info: dict | None = None,
    recipe: dict | None = None,
) -> str:
    """``evaluations``: column title -> result of ``evaluate``/``cross_validate``;
    ``representations``: pose representation -> external metrics (``recipes/demo_weights.py
    compare``); ``domain``: set of recordings -> share flagged (``... domain``);
    ``card_info``: the site's words (``load_card_info``); ``recipe``: a cross-validation's
    ``recipe``, then the card describes the recipe, not one set of weights (``meta`` unused).
    What the infants were (simulated or recordings) is read from the provenance unless
    ``simulated`` says it."""
    info = card_info or {}
    prov = {"data_declared": recipe.get("data_declared")} if recipe else meta.provenance
    kind, counts = declared_data(prov)
    if simulated is not None and counts is None:
        kind = "simulated" if simulated else "unknown"
    if recipe:
        title = f"# Model card: the `mam train` recipe, {recipe['k']}-fold cross-validated"
    else:
        title = f"# Model card: `{meta.name}` {meta.version}"
    banner = {
        "simulated": DEMO_BANNER,
        "mixed": f"**Trained on {(counts or {}).get('simulated', '?')} SIMULATED infants besides "
        "recordings. Decision support only, not a diagnosis.**",
    }.get(kind, "**Decision support only, not a diagnosis.**")
    if recipe and kind == "simulated":
        banner = "**A recipe cross-validated on SIMULATED infants. Not for clinical use.**"
    lines = [title, "", banner, ""]
    if info.get("site"):
        lines += [f"Site: {info['site']}", ""]
    lines.append("## Intended use")
    if info.get("intended_use"):
        lines += [info["intended_use"], "", SITE_USE]
    else:
        lines += [DEMO_USE] if kind == "simulated" else [NOT_STATED, "", SITE_USE]
    if info or kind != "simulated":
        contacts = [f"- {c}" for c in _listed(info.get("contacts"))]
        lines += ["", "## Population", info.get("population") or NOT_STATED,
                  "", "## Contacts", *(contacts or [NOT_STATED])]  # fmt: skip
    lines += ["", *(_recipe_section(recipe) if recipe else _weights_section(meta))]
    declared = _declared_line(kind, counts)
    if declared:
        lines.append(declared)
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
            "the default pose backend (`python recipes/demo_weights.py compare`; the run that "
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
            "(`python recipes/demo_weights.py domain`):",
            "",
            "| recordings | motion statistics | clip embedding | both (shipped) |",
            "|---|---|---|---|",
        ]
        for name, r in domain.items():
            lines.append(f"| {name} | {r['motion']:.0%} | {r['embedding']:.0%} | "
                         f"{r['both']:.0%} |")  # fmt: skip
    lines += ["", "## Known limits"]
    if kind in ("simulated", "mixed"):
        lines.append(
            "- Trained and evaluated on simulated movement (real infant motion as background, "
            "simulated general movements and FMs on top): these numbers say the procedure works, "
            "not that the model recognises real fidgety movements. Real motion without the "
            "simulated component is outside its domain and answered `indeterminate`."
        )
    else:
        lines.append(
            "- Measured on the data named above: other sites, cameras and populations can "
            "differ; evaluate on local recordings (`mam evaluate`) before relying on it."
        )
    lines += [f"- {x}" for x in _listed(info.get("limitations"))]
    lines += [
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
