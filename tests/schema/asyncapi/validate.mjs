// Parse AsyncAPI documents with the official parser (@asyncapi/parser) and print, per
// file, its diagnostics as JSON: [{"file", "parsed": bool, "diagnostics": [{code,
// message, path, severity}]}]. Severity: 0 error, 1 warning, 2 information, 3 hint.
// Used by tests/schema/test_asyncapi.py.
import { readFileSync } from "node:fs";
import { Parser } from "@asyncapi/parser";

const parser = new Parser();
const results = [];
for (const file of process.argv.slice(2)) {
  const { document, diagnostics } = await parser.parse(readFileSync(file, "utf8"));
  results.push({
    file,
    parsed: document !== undefined,
    diagnostics: diagnostics.map((d) => ({
      code: String(d.code),
      message: d.message,
      path: d.path,
      severity: d.severity,
    })),
  });
}
console.log(JSON.stringify(results));
