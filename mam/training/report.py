"""The validation report of ``mam evaluate --out DIR``: ``report.json`` and ``report.html``, for
an ethics board or a site's clinical lead.

What is in it, and why:

* The model and data identity first (weights name, version and sha256, or the cross-validated
  recipe; data folders and a digest of the evaluated poses), and the decision-support
  disclaimer.
* The leakage check (``mam.training.evaluate.leakage_check``) in a red box at the top when
  evaluated infants were used to train or calibrate the weights: such numbers are optimistic.
* Per evaluated set (cross-validation, or one set, and the external set): every metric with its
  95% bootstrap interval over infants (cross-validation: mean +- sd over folds, and the folds'
  infants pooled with their interval), confusion counts at the operating point, the ROC and PR
  curves with the operating point marked, the reliability curve with its bin counts, subgroups
  (sex, gestational age, corrected age; infants without data as their own row), and the
  abstention rate by reason. Cross-validation pools the folds' per-infant results (each infant
  at its own fold model's threshold) for the curves and subgroups.
* The baselines of ``--baselines`` (the paper's Table 2 layout) where they were scored.

Offline: one HTML file, inline CSS and inline SVG (matplotlib), no scripts or external assets.
No infant identifier is written: curves and counts only.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mam import DISCLAIMER, __version__
from mam.files import write_atomic
from mam.training.model_card import ROWS

REPORT_FORMAT = 1
CALIBRATION_BINS = 10
# The card's metrics, less the calibration reference rows (the report shows those beside the
# reliability curve), with one label of the card shortened for the report's table.
METRICS = tuple(
    (key, "PR-AUC (average precision)" if key == "pr_auc" else label)
    for key, label in ROWS
    if key not in ("ece_if_calibrated", "ece_p_value")
)
SEX = ("female", "male")
GESTATIONAL_AGE = ((None, 32.0, "< 32 weeks"), (32.0, 37.0, "32-37 weeks"),
                   (37.0, None, ">= 37 weeks"))  # fmt: skip
CORRECTED_AGE = ((None, 9.0, "< 9 weeks"), (9.0, 12.0, "9-12 weeks"), (12.0, 16.0, "12-16 weeks"),
                 (16.0, 20.0, "16-20 weeks"), (20.0, None, ">= 20 weeks"))  # fmt: skip
NO_DATA = "no infant data"


def check_output_paths(out_dir: Path | None = None, files: Sequence[Path | None] = ()) -> None:
    """Create ``out_dir`` and the parents of ``files`` and make sure each can be written, so a
    long evaluation does not end in an unwritable path."""
    from mam.batch.runner import OutputNotWritableError as OutputPathError

    dirs = ([out_dir] if out_dir else []) + [Path(f).parent for f in files if f]
    for d in dirs:
        try:
            Path(d).mkdir(parents=True, exist_ok=True)
            probe = Path(d) / f".mam-write-test-{id(dirs)}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise OutputPathError(
                f"cannot write to {d}: {e.strerror or type(e).__name__}"
            ) from None
    for f in files:
        if f and Path(f).is_dir():
            raise OutputPathError(f"{f} is a folder; give a file name")


def data_identity(records, folders: Sequence[Path | str]) -> dict:
    """What was evaluated, without naming an infant: folders, counts, and one digest of the
    evaluated poses (sha256 over their sorted content digests)."""
    digests = sorted(r.digest for r in records)
    return {
        "folders": [str(f) for f in folders],
        "infants": len(records),
        "risk_infants": sum(r.group == "risk" for r in records),
        "poses_sha256": hashlib.sha256("\n".join(digests).encode()).hexdigest(),
    }


# -- the numbers ----------------------------------------------------------------------------------
def _arrays(pi: dict):
    return (np.array(pi["risk"], bool), np.array(pi["risk_probability"], np.float64),
            np.array(pi["threshold"], np.float64))  # fmt: skip


def operating_point(pi: dict) -> dict:
    """Where the classification sits on the curves: each infant at its model's threshold."""
    y, p, th = _arrays(pi)
    pred = p >= th
    tp, fp = int(np.sum(pred & y)), int(np.sum(pred & ~y))
    fn, tn = int(np.sum(~pred & y)), int(np.sum(~pred & ~y))
    ths = sorted(set(th.tolist()))
    return {
        "tpr": tp / (tp + fn) if tp + fn else None,
        "fpr": fp / (fp + tn) if fp + tn else None,
        "precision": tp / (tp + fp) if tp + fp else None,
        "threshold": ths[0] if len(ths) == 1 else ths,
    }


def curves(pi: dict) -> dict | None:
    """ROC and precision-recall points (None without both groups)."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    y, p, _ = _arrays(pi)
    if not 0 < y.sum() < len(y):
        return None
    fpr, tpr, _ = roc_curve(y, p)
    prec, rec, _ = precision_recall_curve(y, p)
    r4 = lambda a: [round(float(v), 4) for v in a]  # noqa: E731
    return {"roc": {"fpr": r4(fpr), "tpr": r4(tpr)},
            "pr": {"recall": r4(rec), "precision": r4(prec)},
            "prevalence": float(y.mean())}  # fmt: skip


def calibration_bins(pi: dict, bins: int = CALIBRATION_BINS) -> list[dict]:
    """Equal-width bins of P(risk): infants, mean P(risk) and the observed share at risk."""
    y, p, _ = _arrays(pi)
    idx = np.clip((p * bins).astype(int), 0, bins - 1)
    out = []
    for b in range(bins):
        m = idx == b
        n = int(m.sum())
        out.append({"bin": [b / bins, (b + 1) / bins], "infants": n,
                    "mean_probability": float(p[m].mean()) if n else None,
                    "observed_risk": float(y[m].mean()) if n else None})  # fmt: skip
    return out


def _band(v, bands) -> str:
    if v is None:
        return NO_DATA
    for lo, hi, label in bands:
        if (lo is None or v >= lo) and (hi is None or v < hi):
            return label
    return NO_DATA


def subgroups(pi: dict) -> list[dict]:
    """Metrics per sex, gestational-age band and corrected-age band, each infant at its model's
    threshold; every band is listed, empty or not, and infants without data have their own
    row (an ethics board sees who is missing as well as how the rest fare)."""
    from mam.training.evaluate import _metrics

    y, p, th = _arrays(pi)
    f = np.array(pi["fms_frequency"], np.float64)
    ind = np.array(pi["indeterminate"], bool)
    cats = list(pi["fms_category"])
    groupings = (
        ("sex", [s or NO_DATA for s in pi["sex"]], [*SEX, NO_DATA]),
        ("gestational age", [_band(v, GESTATIONAL_AGE) for v in pi["gestational_age_weeks"]],
         [b[2] for b in GESTATIONAL_AGE] + [NO_DATA]),
        ("corrected age", [_band(v, CORRECTED_AGE) for v in pi["corrected_age_weeks"]],
         [b[2] for b in CORRECTED_AGE] + [NO_DATA]),
    )  # fmt: skip
    rows = []
    for variable, labels, order in groupings:
        labels = np.array(labels)
        for group in order:
            m = labels == group
            row = {"variable": variable, "group": group}
            if m.any():
                met = _metrics(y[m], p[m], th[m], f[m], [c for c, k in zip(cats, m) if k])
                row.update({k: met[k] for k in ("infants", "risk_infants", "auc", "sensitivity",
                                                "specificity", "ppv", "npv")})  # fmt: skip
                row["abstention_rate"] = float(ind[m].mean())
            else:
                row.update(infants=0, risk_infants=0)
            rows.append(row)
    return rows


def abstention_by_reason(pi: dict) -> dict:
    """Share of infants answered indeterminate, in all and per reason (an infant may have
    several; numbers inside a reason are masked so that like reasons count together)."""
    n = len(pi["indeterminate"])
    counts: dict[str, int] = {}
    for ind, reasons in zip(pi["indeterminate"], pi["reasons"]):
        if ind:
            for r in {re.sub(r"\d+(?:\.\d+)?", "N", r) for r in reasons} or {"(none given)"}:
                counts[r] = counts.get(r, 0) + 1
    k = int(sum(pi["indeterminate"]))
    return {"infants": k, "rate": k / n if n else None,
            "by_reason": [{"reason": r, "infants": c, "rate": c / n}
                          for r, c in sorted(counts.items(), key=lambda kv: -kv[1])]}  # fmt: skip


def _metric_rows(res: dict, pooled: dict | None) -> dict:
    """metric -> value and interval (one set), or mean, sd and the pooled value and interval
    (cross-validation)."""
    out = {}
    for key, label in METRICS:
        if pooled is None:
            out[key] = {"label": label, "value": res.get(key), "ci": res.get(f"{key}_ci")}
        else:
            out[key] = {"label": label, "mean": res.get(key), "sd": res.get(f"{key}_sd"),
                        "pooled": pooled.get(key), "ci": pooled.get(f"{key}_ci")}  # fmt: skip
    return out


def report_set(title: str, res: dict) -> dict:
    """One evaluated set as report.json holds it (no infant identifiers)."""
    cv = "folds" in res
    pooled = res.get("pooled") if cv else None
    if cv and pooled is None:
        from mam.training.evaluate import pool

        pooled = pool(res["folds"])
    whole = pooled if cv else res
    pi = whole["per_infant"]
    inside = whole["in_domain"]
    out = {
        "title": title,
        "kind": "cross-validation" if cv else "evaluation",
        "folds": res.get("k") if cv else None,
        "infants": whole["infants"],
        "risk_infants": whole["risk_infants"],
        "metrics": _metric_rows(res, pooled),
        "in_domain": {
            k: {"label": lab, "value": inside.get(k), "ci": inside.get(f"{k}_ci")}
            for k, lab in METRICS
            if k != "abstention_rate"
        },  # fmt: skip
        "in_domain_infants": inside["infants"],
        "confusion": {"all": whole["confusion"], "in_domain": inside["confusion"]},
        "operating_point": operating_point(pi),
        "curves": curves(pi),
        "calibration_curve": calibration_bins(pi),
        "subgroups": subgroups(pi),
        "abstention": abstention_by_reason(pi),
        "leakage": res.get("leakage"),
    }
    if cv:
        out["per_fold"] = [
            {"fold": f.get("fold"), "infants": f["infants"], "risk_infants": f["risk_infants"],
             **{k: f.get(k) for k, _ in METRICS},
             "threshold": f.get("threshold"), "fms_category_thresholds":
             (f.get("model") or {}).get("fms_category_thresholds")}
            for f in res["folds"]
        ]  # fmt: skip
    return out


def build_report(
    sets: dict[str, dict],
    model: dict,
    data: dict,
    baselines: dict[str, dict] | None = None,
    site: dict | None = None,
) -> dict:
    """report.json: ``sets`` title -> result of ``evaluate``/``cross_validate``; ``model``: the
    weights' or the recipe's identity; ``data``: ``data_identity`` (and the external set's
    under ``external``); ``baselines``: set title -> method -> result; ``site``: the site's
    words (``mam.training.model_card.load_card_info``)."""
    body = {title: report_set(title, r) for title, r in sets.items()}
    checks = {t: s["leakage"] for t, s in body.items() if s.get("leakage")}
    return {
        "report_format": REPORT_FORMAT,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "mam_version": __version__,
        "disclaimer": DISCLAIMER,
        "model": model,
        "data": data,
        "leakage": {
            "warning": any(c.get("leaked") for c in checks.values()),
            "not_checked": [t for t, c in checks.items() if not c.get("checked")],
            "checks": checks,
        },
        "sets": list(body.values()),
        "site": site or {},
        "baselines": _baselines_json(baselines),
    }


def _baselines_json(baselines: dict | None) -> dict | None:
    """Per set and method, the summary numbers (no per-infant values)."""
    if not baselines:
        return None
    keep = ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "pr_auc", "k",
            "cutoffs", "threshold")  # fmt: skip
    return {s: {m: {k: v for k, v in r.items()
                    if k in keep or (k.endswith("_sd") and k[:-3] in keep)}
                for m, r in rows.items()} for s, rows in baselines.items()}  # fmt: skip


# -- the pictures ---------------------------------------------------------------------------------
def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    svg = buf.getvalue()
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)  # creator, date: not needed
    return svg[svg.index("<svg") :]  # inline: no XML prolog or doctype


def figures(s: dict, slug: str) -> dict[str, str]:
    """Inline SVGs of one report set: ROC and PR with the operating point, reliability curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "mam-report"  # stable element ids, so reports diff cleanly
    out = {}
    c, op = s["curves"], s["operating_point"]
    if c is not None:
        fig, ax = plt.subplots(figsize=(4.2, 4.2))
        auc = s["metrics"]["auc"]
        auc = auc.get("value", auc.get("pooled"))
        ax.plot(c["roc"]["fpr"], c["roc"]["tpr"], lw=1.8, label=f"MAM (AUC {_fmt(auc)})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        if op["fpr"] is not None and op["tpr"] is not None:
            ax.plot([op["fpr"]], [op["tpr"]], "o", ms=9, color="#b00020",
                    gid=f"operating-point-roc-{slug}", label="operating point")  # fmt: skip
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(-0.02, 1.02),
               ylim=(-0.02, 1.02), title="ROC (risk)")  # fmt: skip
        ax.legend(loc="lower right", fontsize=8)
        out["roc"] = _svg(fig)
        fig, ax = plt.subplots(figsize=(4.2, 4.2))
        ax.plot(c["pr"]["recall"], c["pr"]["precision"], lw=1.8, drawstyle="steps-post",
                label="MAM")  # fmt: skip
        ax.axhline(c["prevalence"], color="k", ls=":", lw=0.8, label="prevalence")
        if op["tpr"] is not None and op["precision"] is not None:
            ax.plot([op["tpr"]], [op["precision"]], "o", ms=9, color="#b00020",
                    gid=f"operating-point-pr-{slug}", label="operating point")  # fmt: skip
        ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", xlim=(-0.02, 1.02),
               ylim=(-0.02, 1.05), title="Precision-recall (risk)")  # fmt: skip
        ax.legend(loc="lower left", fontsize=8)
        out["pr"] = _svg(fig)
    bins = [b for b in s["calibration_curve"] if b["infants"]]
    fig, (ax, axn) = plt.subplots(2, 1, figsize=(4.2, 5.0), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})  # fmt: skip
    ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="perfect calibration")
    if bins:
        x = [b["mean_probability"] for b in bins]
        ax.plot(x, [b["observed_risk"] for b in bins], "o-", label="observed share at risk")
        for b in bins:
            ax.annotate(
                str(b["infants"]),
                (b["mean_probability"], b["observed_risk"]),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=7,
            )
    edges = [b["bin"][0] for b in s["calibration_curve"]]
    axn.bar(edges, [b["infants"] for b in s["calibration_curve"]], width=1 / CALIBRATION_BINS,
            align="edge", color="#888", edgecolor="white")  # fmt: skip
    ax.set(ylabel="observed share at risk", xlim=(0, 1), ylim=(-0.05, 1.18),
           title="Reliability (numbers: infants per bin)")  # fmt: skip
    axn.set(xlabel="P(risk)", ylabel="infants")
    ax.legend(loc="upper left", fontsize=8)
    out["calibration"] = _svg(fig)
    return out


# -- writing --------------------------------------------------------------------------------------
def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, list):
        return ", ".join(_fmt(x, digits) for x in v)
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def render_html(report: dict) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("mam.training", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["num"] = _fmt
    env.filters["pct"] = lambda v: "n/a" if v is None else f"{v:.1%}"
    sets = []
    for i, s in enumerate(report["sets"]):
        sets.append({**s, "figures": figures(s, f"s{i}")})
    detail = DISCLAIMER.split(". ", 1)[-1]  # its first sentence is the banner's own
    return env.get_template("report.html").render(r=report, sets=sets, detail=detail)


def write_validation_report(report: dict, out: str | Path) -> list[Path]:
    """``out/report.json`` and ``out/report.html`` (the folder must exist)."""
    out = Path(out)
    j = write_atomic(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    h = write_atomic(out / "report.html", render_html(report).encode())
    return [j, h]
