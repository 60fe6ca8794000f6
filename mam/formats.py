"""One registry of the ways a result is written out: ``mam screen --format NAME``, the service's
``?format=NAME`` / ``Accept`` negotiation and the batch's per-result files all look formats up
here, so a format added with one ``register(OutputFormat(...))`` is offered by all of them.

A format is a name, a media type, whether it is binary, and ``render(result, context) -> str |
bytes``. ``context`` (``RenderContext``) carries what only the caller knows: the result's id, the
FHIR references, the DICOM recording an SR files itself under, the issue time, and whether JSON
is for a person (indented) or a machine (one line: the service, NDJSON).

Renderers import what they need when called, so the registry is cheap to import (the CLI's
parser reads the names from it)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = [
    "RenderContext",
    "OutputFormat",
    "formats",
    "get",
    "names",
    "negotiate",
    "register",
    "text",
    "unregister",
]

SCREENING = "screening"  # mam.schemas.ScreeningResult
INSTANCES = "instances"  # mam.schemas.InstancesResult (the service's tensor route)


@dataclass(frozen=True)
class RenderContext:
    """What a renderer may use beyond the result.

    Args:
        result_id: the result's id (the CLI and batch mint one; the service's request or task id).
        fhir: ``mam.fhir.FhirContext`` with the caller's references; None: a bare one.
        source: ``mam.dicom_sr.SourceVideo`` of a DICOM recording the SR is filed under.
        issued: when the result was made (default: now).
        codes: ``mam.fhir.FhirCodes`` of the site (default: from the environment).
        pretty: JSON indented for a person; False: compact, one line.
    """

    result_id: str
    fhir: Any = None
    source: Any = None
    issued: datetime | None = None
    codes: Any = None
    pretty: bool = True


@dataclass(frozen=True)
class OutputFormat:
    """One output format.

    ``kinds``: the results it renders (``"screening"``, ``"instances"``). ``uses``: the caller's
    inputs it reads, so a front end refuses them for other formats: ``"fhir"`` (references),
    ``"dicom_source"`` (the DICOM recording's study, for ``--echo-dicom-uids``)."""

    name: str
    media_type: str
    render: Callable[[Any, RenderContext], str | bytes]
    binary: bool = False
    help: str = ""
    kinds: frozenset[str] = frozenset({SCREENING})
    uses: frozenset[str] = field(default_factory=frozenset)

    def to_bytes(self, result, context: RenderContext) -> bytes:
        out = self.render(result, context)
        return out if isinstance(out, bytes) else out.encode()


_REGISTRY: dict[str, OutputFormat] = {}


def register(fmt: OutputFormat, replace: bool = False) -> OutputFormat:
    """Add ``fmt`` (``ValueError`` for a taken name unless ``replace``)."""
    if fmt.name in _REGISTRY and not replace:
        raise ValueError(f"output format {fmt.name!r} is already registered")
    _REGISTRY[fmt.name] = fmt
    return fmt


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get(name: str) -> OutputFormat:
    """The format called ``name`` (``KeyError`` when there is none)."""
    return _REGISTRY[name]


def names() -> list[str]:
    return list(_REGISTRY)


def formats(kind: str | None = None) -> list[OutputFormat]:
    """Every format, in registration order (those rendering ``kind`` only, when given)."""
    return [f for f in _REGISTRY.values() if kind is None or kind in f.kinds]


def negotiate(query: str | None, accept: str | None, kind: str = SCREENING) -> OutputFormat:
    """The service's choice: ``?format=NAME`` when it names a format for ``kind``; else the
    ``Accept`` media range with the highest q (the first of equals) that a format serves exactly;
    else JSON. An unknown name or media type falls back to JSON, as a client that asks for
    nothing gets."""
    offered = {f.name: f for f in formats(kind)}
    if query:
        return offered.get(query.strip().lower(), _REGISTRY["json"])
    by_type = {f.media_type.split(";")[0].strip().lower(): f for f in offered.values()}
    ranges = []
    for pos, part in enumerate((accept or "").split(",")):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for p in params:
            k, _, v = p.partition("=")
            if k.strip().lower() == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        if q > 0 and media.lower() in by_type:
            ranges.append((-q, pos, by_type[media.lower()]))
    return min(ranges, key=lambda r: r[:2])[2] if ranges else _REGISTRY["json"]


# -- the formats ----------------------------------------------------------------------------------
def text(r) -> str:
    """The result as a clinician reads it: the answer, whether its numbers may be used, why."""
    from mam import DISCLAIMER
    from mam.presentation import probability as p

    c, d = r.classification, r.domain
    unusable = "" if r.probabilities_usable else "   [not to be used: see the warning]"
    if c.label == "indeterminate":
        head = "Classification:    INDETERMINATE (the model cannot speak for this recording)"
    else:
        head = (f"Classification:    {c.label.upper()} (P(risk) = {p(r.risk_probability)}, "
                f"threshold {c.threshold:.2f})")  # fmt: skip
    score = "not scored" if d.score is None else f"score {d.score:.2f}, threshold {d.threshold:.2f}"
    lines = [
        head,
        f"P(risk):           {p(r.risk_probability)} (model alone: {c.model_label}){unusable}",
        f"FMs frequency:     {r.fms_frequency:.2f} of {len(r.clips)} clips ({r.fms_category})"
        + unusable,
        f"Training domain:   {'in domain' if d.in_domain else 'OUT OF DOMAIN'} ({score})",
        f"Tracking quality:  {r.quality.tracked_fraction:.0%} of {r.quality.duration_s:.0f} s "
        f"tracked, longest gap {r.quality.longest_gap_s:.1f} s",
        "Top FMs clips:     "
        + ", ".join(
            f"{c.start_s:.1f}-{c.end_s:.1f} s (P={c.fms_probability:.2f})" for c in r.top_fms_clips
        ),
        f"Model:             {r.model.name} {r.model.version}, digest {r.model.digest[:12]} "
        f"({r.model.provenance}); "
        f"{r.model.runtime}/{r.model.device}; pose {r.model.pose_backend}",
    ]
    lines += [f"Warning:           {w}" for w in r.warnings]
    lines.append(DISCLAIMER)
    return "\n".join(lines)


def _dumps(doc: dict, pretty: bool) -> str:
    return json.dumps(doc, indent=2) if pretty else json.dumps(doc, separators=(",", ":"))


def _json(result, ctx: RenderContext) -> str:
    return result.model_dump_json(indent=2 if ctx.pretty else None)


def _fhir(result, ctx: RenderContext) -> str:
    from mam.fhir import FhirCodes, FhirContext, build_bundle

    fctx = ctx.fhir or FhirContext(result_id=ctx.result_id, issued=ctx.issued)
    return _dumps(build_bundle(result, fctx, ctx.codes or FhirCodes.from_env()), ctx.pretty)


def _dicom_sr(result, ctx: RenderContext) -> bytes:
    from mam.dicom_sr import sr_bytes

    return sr_bytes(result, ctx.result_id, ctx.source, ctx.issued)


register(OutputFormat("text", "text/plain; charset=utf-8", lambda r, _: text(r),
                      help="the result as a clinician reads it"))  # fmt: skip
register(OutputFormat("json", "application/json", _json, help="the ScreeningResult",
                      kinds=frozenset({SCREENING, INSTANCES})))  # fmt: skip
register(OutputFormat("fhir", "application/fhir+json", _fhir,
                      help="an HL7 FHIR R4 transaction Bundle",
                      kinds=frozenset({SCREENING, INSTANCES}),
                      uses=frozenset({"fhir", "dicom_source"})))  # fmt: skip
register(OutputFormat("dicom-sr", "application/dicom", _dicom_sr, binary=True,
                      help="a DICOM Comprehensive SR",
                      uses=frozenset({"dicom_source"})))  # fmt: skip
