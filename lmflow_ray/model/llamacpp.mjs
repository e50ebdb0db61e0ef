// llama.cpp (node-llama-cpp's prebuilt CPU binary) behind a line protocol, for lmflow_ray/model/llamacpp.py.
// argv: MODULE_DIR (node-llama-cpp's install folder) GGUF THREADS CONTEXT
// stdin, one JSON object a line: {"prompt": text, "max_tokens": n}; the prompt's special tokens are parsed.
// stdout, one JSON object a line: {"ready": true, ...} once loaded; then per request
// {"token": id, "text": all text so far} for each token and {"done": reason, "tokens": [...], "prompt_tokens": n}.
import {readFileSync} from "node:fs";
import {join} from "node:path";
import {createInterface} from "node:readline";
import {pathToFileURL} from "node:url";

const [moduleDir, ggufPath, threads, contextSize] = process.argv.slice(2);
const pkg = JSON.parse(readFileSync(join(moduleDir, "package.json"), "utf8"));
const entry = typeof pkg.exports === "string" ? pkg.exports : (pkg.exports?.["."]?.import ?? pkg.exports?.["."]?.default ?? pkg.main);
const {getLlama} = await import(pathToFileURL(join(moduleDir, typeof entry === "string" ? entry : entry.default)).href);

const send = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
try {
  const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
  const model = await llama.loadModel({modelPath: ggufPath});
  const context = await model.createContext({contextSize: Math.min(Number(contextSize), model.trainContextSize), threads: Number(threads), sequences: 1});
  const sequence = context.getSequence();
  send({ready: true, context: context.contextSize});
  const lines = createInterface({input: process.stdin, terminal: false});
  for await (const line of lines) {
    if (!line.trim()) continue;
    const request = JSON.parse(line);
    const prompt = model.tokenize(request.prompt, true);
    await sequence.clearHistory();
    const tokens = [];
    if (prompt.length + request.max_tokens > context.contextSize) {
      send({error: `the prompt (${prompt.length} tokens) and ${request.max_tokens} new tokens exceed the context of ${context.contextSize}`});
      continue;
    }
    for await (const token of sequence.evaluate(prompt, {temperature: 0})) {
      if (model.isEogToken(token)) break;  // end of generation (evaluate also ends by itself there)
      tokens.push(token);
      send({token, text: model.detokenize(tokens)});
      if (tokens.length >= request.max_tokens) break;
    }
    send({done: tokens.length >= request.max_tokens ? "length" : "stop", tokens, prompt_tokens: prompt.length});
  }
  process.exit(0);
} catch (err) {
  send({error: String(err?.message ?? err)});
  process.exit(3);
}
