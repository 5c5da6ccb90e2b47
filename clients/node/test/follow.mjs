// One streaming chat job, followed to its end: what a reader sees when its worker dies mid-stream.
//
// tests/test_node_client.py runs this and SIGKILLs the worker that holds the job after a few chunks;
// the job runs again elsewhere, and its stream says so with a reset entry ("\f" from stream()).
// Prints one JSON line, {"step": "followed", "id", "pieces", "result"}; exits 1 on any exception.
//
//   REDIS_URL=redis://127.0.0.1:6380/0 LLM_JOB_ID=job-1 node test/follow.mjs
import { Client } from '@llm-worker/client';

const client = new Client({ url: process.env.REDIS_URL, userId: 'node-follow' });
try {
  const id = await client.submit(
    'chat',
    { messages: [{ role: 'user', content: 'tell me more' }] },
    { model: process.env.LLM_MODEL || 'llama3.2', stream: true, id: process.env.LLM_JOB_ID },
  );
  const pieces = [];
  for await (const text of client.stream(id, { timeoutMs: 120_000 })) pieces.push(text);
  const result = await client.wait(id, { timeoutMs: 60_000 });
  console.log(JSON.stringify({ step: 'followed', id, pieces, result }));
} catch (err) {
  console.log(JSON.stringify({ step: 'error', name: err && err.name, message: err && err.message }));
  process.exitCode = 1;
} finally {
  await client.close();
}
