#!/usr/bin/env node
// A Pipes conformance harness (protocol "0.1", conformance/README.md) in plain Node.js: no Pipes library, only
// the standard library. Bootstrap from env or CLI; context inline ("data") or from a "path" file; messages to a
// "path" file (each line one synchronous write, so a crash loses nothing sent) or to stdout/stderr ("stdio").
// stdio_capture is JavaScript-level: what the process writes through process.stdout / process.stderr.
//   python -m conformance run --capabilities conformance/harnesses/node/capabilities.json -- \
//       node conformance/harnesses/node/harness.js
'use strict';
const fs = require('fs');
const zlib = require('zlib');

const MAX_DECODED_BYTES = 64 * 1024 * 1024;

// base64(zlib(json)): standard alphabet with padding, an RFC 1950 zlib stream, UTF-8 JSON, an object.
function decodeParam(value) {
  if (typeof value !== 'string' || value.length % 4 !== 0 || !/^[A-Za-z0-9+/]*={0,2}$/.test(value)) {
    throw new Error('bootstrap param is not standard padded base64');
  }
  const inflated = zlib.inflateSync(Buffer.from(value, 'base64'), { maxOutputLength: MAX_DECODED_BYTES });
  const obj = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(inflated));
  if (obj === null || typeof obj !== 'object' || Array.isArray(obj)) throw new Error('bootstrap param: not an object');
  return obj;
}

function bootstrapParams() {
  const argv = process.argv.slice(2);
  const arg = (flag) => (argv.includes(flag) ? argv[argv.indexOf(flag) + 1]
    : argv.find((a) => a.startsWith(flag + '='))?.slice(flag.length + 1));
  const context = arg('--dagster-pipes-context') ?? process.env.DAGSTER_PIPES_CONTEXT;
  const messages = arg('--dagster-pipes-messages') ?? process.env.DAGSTER_PIPES_MESSAGES;
  if (context === undefined || messages === undefined) throw new Error('not launched by a Pipes orchestrator');
  return [decodeParam(context), decodeParam(messages)];
}

function loadContext(params) {
  if (typeof params.path === 'string') return JSON.parse(fs.readFileSync(params.path, 'utf8'));
  if (params.data !== null && typeof params.data === 'object') return params.data;
  throw new Error(`unsupported context params: ${JSON.stringify(Object.keys(params))}`);
}

function writeAll(fd, text) {
  const buffer = Buffer.from(text, 'utf8');
  for (let offset = 0; offset < buffer.length;) {
    try { offset += fs.writeSync(fd, buffer, offset); } catch (err) { if (err.code !== 'EAGAIN') throw err; }
  }
}

// One JSON line per message, the envelope's keys in the reference's order.
function openChannel(params) {
  let fd;
  if (typeof params.path === 'string') fd = fs.openSync(params.path, 'a');
  else if (params.stdio === 'stdout' || params.stdio === 'stderr') fd = params.stdio === 'stdout' ? 1 : 2;
  else throw new Error(`unsupported messages params: ${JSON.stringify(Object.keys(params))}`);
  return (method, params) => writeAll(fd, JSON.stringify({ __dagster_pipes_version: '0.1', method, params }) + '\n');
}

function captureStdio(send) {
  for (const stream of ['stdout', 'stderr']) {
    const write = process[stream].write.bind(process[stream]);
    process[stream].write = (chunk, ...rest) => {
      send('log_external_stream', { stream, text: String(chunk), extras: {} });
      return write(chunk, ...rest);
    };
  }
}

// The wire's exception shape; JavaScript has no implicit context, so a harness-made link is used for it.
function serializeError(err) {
  if (err === undefined || err === null) return null;
  if (!(err instanceof Error)) return { message: String(err), stack: [], name: null, cause: null, context: null };
  const frames = String(err.stack || '').split('\n').filter((line) => /^\s+at /.test(line));
  return {
    message: `${err.name}: ${err.message}\n`,
    stack: frames.map((line) => line + '\n'),
    name: err.name,
    cause: serializeError(err.cause),
    context: serializeError(err.pipesContext),
  };
}

function makeSteps(context, send) {
  const selected = context.asset_keys;
  const materialized = new Set();
  const orNull = (metadata) => (metadata && Object.keys(metadata).length ? metadata : null);
  const resolveKey = (key) => { // as the reference: a selected key, the only selected one, or any key for an op
    if (key === null || key === undefined) {
      if (!selected || selected.length !== 1) throw new Error(`an asset key is required (selected: ${selected})`);
      return selected[0];
    }
    if (selected && !selected.includes(key)) throw new Error(`asset key ${key} is not selected`);
    return key;
  };
  return {
    echo_context: () => send('report_custom_message', { payload: { context } }),
    log: (s) => send('log', { message: s.message, level: s.level }),
    materialize: (s) => {
      const key = resolveKey(s.asset_key);
      if (materialized.has(key)) throw new Error(`asset ${key} is already materialized`);
      materialized.add(key);
      const [data_version, metadata] = [s.data_version ?? null, orNull(s.metadata)];
      send('report_asset_materialization', { asset_key: key, data_version, metadata });
    },
    check: (s) => send('report_asset_check', {
      asset_key: resolveKey(s.asset_key), check_name: s.check_name, passed: s.passed,
      metadata: orNull(s.metadata), severity: s.severity ?? 'ERROR',
    }),
    custom: (s) => send('report_custom_message', { payload: s.payload }),
    custom_many: (s) => { for (let i = 0; i < s.count; i++) send('report_custom_message', { payload: { seq: i } }); },
    custom_big: (s) => send('report_custom_message', { payload: { size: s.size, data: s.char.repeat(s.size) } }),
    stream: (s) => send('log_external_stream', { stream: s.stream, text: s.text, extras: {} }),
    print: (s) => { process[s.stream].write(s.text); },
    raise: (s) => {
      const err = new Error(s.message, s.cause === null || s.cause === undefined ? {} : { cause: new Error(s.cause) });
      if (s.context !== null && s.context !== undefined) err.pipesContext = new Error(s.context);
      throw err;
    },
    exit: (s) => s.code,
    crash: () => process.exit(17),
  };
}

function main() {
  const [contextParams, messagesParams] = bootstrapParams();
  if ('bucket' in contextParams || 'bucket' in messagesParams) throw new Error('blob stores are not supported');
  const context = loadContext(contextParams);
  const send = openChannel(messagesParams);
  send('opened', { extras: {} });
  if (messagesParams.include_stdio_in_messages) captureStdio(send);
  const steps = makeSteps(context, send);
  let code = 0;
  try {
    for (const step of ((context.extras || {}).conformance || {}).steps || []) {
      if (!Object.hasOwn(steps, step.op)) throw new Error(`unknown step op ${JSON.stringify(step.op)}`);
      const requested = steps[step.op](step);
      if (step.op === 'exit') { code = requested; break; }
    }
    send('closed', {});
  } catch (err) {
    send('closed', { exception: serializeError(err) });
    code = 1;
  }
  process.exit(code);
}

if (require.main === module) main();
else module.exports = { decodeParam, serializeError };
