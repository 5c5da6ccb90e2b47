// Real jobs through a running llm-worker: submit, stream and wait, from Node.
//
// tests/test_node_client.py runs this against a private Redis and a real `llm-worker run` (with the
// Ollama simulator) and asserts on what it prints: one JSON object a line, {"step": ..., ...}. It
// checks little itself, so that the assertions live in one place; it exits 1 on any exception.
//
//   REDIS_URL=redis://127.0.0.1:6380/0 node test/scenario.mjs
import { Client, JobFailed } from '@llm-worker/client';

const MODEL = process.env.LLM_MODEL || 'llama3.2';
const THINKING_MODEL = process.env.LLM_THINKING_MODEL || 'qwen3';
const UNSERVED = process.env.LLM_UNSERVED_QUEUE || 'llm-node-unserved'; // a list no worker serves
const WAIT = { timeoutMs: 60_000 }; // generous: a loaded 2-core machine runs the suite in parallel

const say = (step, fields) => console.log(JSON.stringify({ step, ...fields }));
const ask = (content) => ({ messages: [{ role: 'user', content }] });

async function collect(iterable) {
  const out = [];
  for await (const piece of iterable) out.push(piece);
  return out;
}

const client = new Client({ url: process.env.REDIS_URL, userId: 'node-scenario' });
try {
  {
    const id = await client.submit('chat', ask('Why is the sky blue?'), {
      model: MODEL,
      correlationId: 'node-corr-1',
      timeoutMs: 60_000,
      maxRetries: 1,
    });
    say('chat', { id, result: await client.wait(id, WAIT) });
  }
  {
    const id = await client.submit('chat', ask('Tell me more'), { model: MODEL, stream: true });
    const pieces = await collect(client.stream(id, WAIT));
    say('stream', { id, pieces, result: await client.wait(id, WAIT) });
  }
  {
    const request = { ...ask('Think first'), think: true };
    const id = await client.submit('chat', request, { model: THINKING_MODEL, stream: true });
    const chunks = await collect(client.chunks(id, WAIT));
    say('thinking', { id, chunks, result: await client.wait(id, WAIT) });
  }
  {
    const request = { input: ['first text', 'second text'] };
    const id = await client.submit('embeddings', request, { model: 'nomic-embed-text' });
    const result = await client.wait(id, WAIT);
    const vectors = result && result.response ? result.response.embeddings : null;
    // The vectors' lengths, not the vectors: the output stays small.
    say('embeddings', { id, success: result && result.success, dims: vectors && vectors.map((v) => v.length) });
  }
  {
    const id = await client.submit('generate', { prompt: 'Say hi' }, { model: 'no-such-model' });
    say('failure', { id, result: await client.wait(id, WAIT) });
  }
  {
    const id = await client.submit('chat', ask('Stream this'), { model: 'no-such-model', stream: true });
    try {
      const pieces = await collect(client.stream(id, WAIT));
      say('stream-failure', { id, pieces, thrown: null });
    } catch (err) {
      if (!(err instanceof JobFailed)) throw err;
      say('stream-failure', { id, thrown: err.name, errorType: err.errorType, resultJobId: err.result.jobId });
    }
  }
  {
    // A job in a list no worker serves: waiting for it ends with null at the deadline.
    const id = await client.submit('chat', ask('Nobody takes this'), {
      model: MODEL,
      queue: UNSERVED,
      priority: 7,
      correlationId: 'node-corr-unserved',
      timeoutMs: 1234,
      maxRetries: 2,
      extra: { tenant: 'acme' },
    });
    const started = performance.now();
    const result = await client.wait(id, { timeoutMs: 500 });
    say('timeout', { id, result, elapsedMs: Math.round(performance.now() - started) });
  }
  {
    const before = Date.now(); // the job is due no earlier than this + delayMs, by the host's clock (this one)
    const id = await client.submit('chat', ask('Later, please'), { model: MODEL, delayMs: 1500 });
    const queued = await client.redis.zcard(`${client.keyPrefix}delayed`);
    say('delayed', { id, notBeforeMs: before + 1500, queuedDelayed: queued, result: await client.wait(id, WAIT) });
  }
  {
    // Several waits at once: each blocks on a connection of its own.
    const ids = await Promise.all([1, 2, 3, 4].map((n) => client.submit('chat', ask(`Job ${n}`), { model: MODEL })));
    const results = await Promise.all(ids.map((id) => client.wait(id, WAIT)));
    say('parallel', { ids, successes: results.map((r) => r && r.success), jobIds: results.map((r) => r && r.jobId) });
  }
  {
    try {
      await client.submit('chat', ask('a secret prompt'), { model: 'not a model' });
      say('refused', { thrown: null });
    } catch (err) {
      say('refused', { thrown: err.name, message: err.message });
    }
  }
  say('end', {});
} catch (err) {
  say('error', { name: err && err.name, message: err && err.message, stack: err && err.stack });
  process.exitCode = 1;
} finally {
  await client.close();
}
