// Eclipse Tahu's JavaScript Sparkplug B codec (npm sparkplug-payload, protobufjs): an encoder
// and decoder independent of the daemon's Python protobuf one, for tests/test_sparkplug.py.
//   node sparkplug_codec.js decode < [base64, ...]   -> [payload, ...] (64-bit ints as numbers)
//   node sparkplug_codec.js encode < payload         -> base64
// The folder holding node_modules/sparkplug-payload is given as SPARKPLUG_JS_MODULES.
"use strict";
const path = require("path");
const modules = process.env.SPARKPLUG_JS_MODULES;
const payloads = require(path.join(modules, "node_modules", "sparkplug-payload"))
  .get("spBv1.0");

function plain(value) {
  if (value === null || value === undefined) return value;
  if (typeof value === "object" && typeof value.toNumber === "function" && "low" in value) {
    return value.toNumber();  // a Long
  }
  if (Buffer.isBuffer(value) || value instanceof Uint8Array) return Buffer.from(value).toString("base64");
  if (Array.isArray(value)) return value.map(plain);
  if (typeof value === "object") {
    const out = {};
    for (const [k, v] of Object.entries(value)) out[k] = plain(v);
    return out;
  }
  return value;
}

let input = "";
process.stdin.on("data", (chunk) => { input += chunk; });
process.stdin.on("end", () => {
  const mode = process.argv[2];
  if (mode === "decode") {
    const out = JSON.parse(input).map((b64) => plain(payloads.decodePayload(Buffer.from(b64, "base64"))));
    process.stdout.write(JSON.stringify(out));
  } else if (mode === "encode") {
    process.stdout.write(Buffer.from(payloads.encodePayload(JSON.parse(input))).toString("base64"));
  } else {
    process.stderr.write("usage: node sparkplug_codec.js decode|encode\n");
    process.exit(2);
  }
});
