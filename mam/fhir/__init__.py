"""HL7 FHIR R4 output of screening results, with AI provenance (HL7 AI Transparency on FHIR).

``codes`` (the local code system, site codes, units), ``bundle`` (a result -> a transaction
Bundle: Device, Observations, DiagnosticReport, Provenance), ``parse`` (the numbers back),
``push`` (POST to a site's FHIR server with retries). The service answers FHIR for
``Accept: application/fhir+json`` or ``?format=fhir``; ``mam screen --format fhir`` prints a
Bundle; ``mam batch`` writes ``results.fhir.ndjson`` (one Bundle per line, as in FHIR Bulk Data).
"""

from mam.fhir.bundle import FhirContext, InvalidFhirReferenceError, build_bundle, result_id_for
from mam.fhir.codes import FhirCodes, InvalidFhirConfigError
from mam.fhir.parse import FhirReadback, parse_bundle

FHIR_JSON = "application/fhir+json"

__all__ = [
    "FHIR_JSON",
    "FhirCodes",
    "FhirContext",
    "FhirReadback",
    "InvalidFhirConfigError",
    "InvalidFhirReferenceError",
    "build_bundle",
    "parse_bundle",
    "result_id_for",
]
