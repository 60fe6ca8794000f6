"""HL7 FHIR R4 output of screening results, with AI provenance (HL7 AI Transparency on FHIR).

``codes`` (the local code system, site codes, units), ``bundle`` (a result -> a transaction
Bundle: Device, Observations, DiagnosticReport, Provenance), ``parse`` (the numbers back),
``outbox`` (the one way to a site's FHIR server: a durable outbox, retries, conditional
references resolved, OAuth2), ``definitions`` (the CodeSystem,
StructureDefinition and NamingSystems behind the local URLs), ``outcome`` (an error as an
OperationOutcome). The service answers FHIR for ``Accept: application/fhir+json`` or
``?format=fhir`` (errors then as an OperationOutcome); ``mam screen --format fhir`` prints a
Bundle; ``mam batch`` writes ``results.fhir.ndjson``: NDJSON of transaction Bundles, one per
line (not a FHIR Bulk Data export, whose files hold one resource per line).
"""

from mam.fhir.bundle import (
    FhirContext,
    InvalidFhirIdentifierError,
    InvalidFhirReferenceError,
    build_bundle,
    result_id_for,
)
from mam.fhir.codes import FhirCodes, InvalidFhirConfigError
from mam.fhir.outcome import operation_outcome
from mam.fhir.parse import FhirReadback, parse_bundle

FHIR_JSON = "application/fhir+json"

__all__ = [
    "FHIR_JSON",
    "FhirCodes",
    "FhirContext",
    "FhirReadback",
    "InvalidFhirConfigError",
    "InvalidFhirIdentifierError",
    "InvalidFhirReferenceError",
    "build_bundle",
    "operation_outcome",
    "parse_bundle",
    "result_id_for",
]
