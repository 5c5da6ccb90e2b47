// Checks that need no Redis: how the package loads, and what submit() refuses, and how it says so.
// The behaviour against a running llm-worker is test/scenario.mjs, which the Python suite runs
// (tests/test_node_client.py) with a real Redis and a real service.
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import { test } from 'node:test';

import * as imported from '@llm-worker/client';

const require = createRequire(import.meta.url);
const { Client, JobFailed, NotReplicated, StreamTimeout, DEFAULT_QUEUES } = require('@llm-worker/client');

// Never sent: each case below is refused before any command. A Redis that does not exist proves it.
const offline = () => new Client({ url: 'redis://127.0.0.1:1/0', redisOptions: { lazyConnect: true } });
const SECRET = 'the launch code is 0000';
const chat = { messages: [{ role: 'user', content: SECRET }] };

test('require and import give the same exports', () => {
  assert.equal(imported.Client, Client);
  assert.equal(imported.JobFailed, JobFailed);
  for (const name of ['Client', 'JobFailed', 'NotReplicated', 'StreamTimeout', 'DEFAULT_QUEUES', 'JOB_TYPES']) {
    assert.ok(name in imported, name);
  }
  assert.deepEqual(DEFAULT_QUEUES, {
    chat: 'llm-chat',
    embeddings: 'llm-embeddings',
    batch: 'llm-batch',
    priority: 'llm-priority',
  });
});

test('errors are classes with their fields', () => {
  const failed = new JobFailed({ jobId: 'j1', errorType: 'model', error: 'model "x" not found' });
  assert.ok(failed instanceof Error);
  assert.equal(failed.name, 'JobFailed');
  assert.equal(failed.errorType, 'model');
  assert.equal(failed.jobId, 'j1');
  assert.equal(new NotReplicated('j1', 2, 1).confirmed, 1);
  assert.equal(new StreamTimeout('j1', 5).timeoutMs, 5);
});

const refused = [
  ['an unknown type', ['chat-completion', chat], TypeError, /type must be one of chat, generate, embeddings, batch/],
  ['a request that is not an object', ['chat', 'hello'], TypeError, /request must be an object/],
  ['a chat without messages', ['chat', { prompt: 'x' }], TypeError, /needs messages/],
  [
    'a message content that is not text',
    ['chat', { messages: [{ role: 'user', content: 5 }] }],
    TypeError,
    /content must be a string/,
  ],
  ['a generate without a prompt', ['generate', { messages: [] }], TypeError, /needs prompt/],
  ['embeddings without input', ['embeddings', { input: [] }], TypeError, /needs input/],
  [
    'a batch item of an unknown type',
    ['batch', { requests: [{ type: 'x', request: {} }] }],
    TypeError,
    /requests\[0\]/,
  ],
  ['an id with a space', ['chat', chat, { id: 'a b' }], TypeError, /id must be 1 to 128/],
  ['an id too long', ['chat', chat, { id: 'x'.repeat(129) }], TypeError, /id must be/],
  ['a model with a space', ['chat', chat, { model: 'llama 3' }], TypeError, /model must be/],
  ['a priority out of range', ['chat', chat, { priority: 2_000_000 }], RangeError, /priority must be an integer/],
  ['a fractional timeout', ['chat', chat, { timeoutMs: 1.5 }], RangeError, /timeoutMs must be an integer/],
  ['negative retries', ['chat', chat, { maxRetries: -1 }], RangeError, /maxRetries/],
  ['a negative delay', ['chat', chat, { delayMs: -5 }], RangeError, /delayMs/],
  ['an unknown option (a typo)', ['chat', chat, { timeout: 5 }], TypeError, /unknown option "timeout"/],
  ['a bad queue name', ['chat', chat, { queue: 'llm chat' }], TypeError, /queue must be a queue name/],
  ['extra replacing an own field', ['chat', chat, { extra: { userId: 'x' } }], TypeError, /extra may not set userId/],
  [
    'a request that JSON cannot hold',
    ['chat', { messages: [{ role: 'user', content: SECRET }], n: 10n }],
    TypeError,
    /not JSON-serialisable/,
  ],
];

for (const [what, args, kind, message] of refused) {
  test(`submit refuses ${what}, without the prompt in the message`, async () => {
    const client = offline();
    try {
      await assert.rejects(client.submit(...args), (err) => {
        assert.ok(err instanceof kind, `${err.name}: ${err.message}`);
        assert.match(err.message, message);
        assert.ok(!err.message.includes(SECRET), err.message);
        return true;
      });
    } finally {
      await client.close();
    }
  });
}

test('wait and stream refuse a bad id or timeout', async () => {
  const client = offline();
  try {
    await assert.rejects(client.wait('a b'), /jobId must be a job id/);
    await assert.rejects(client.wait('job-1', { timeoutMs: -1 }), RangeError);
    await assert.rejects(client.wait('job-1', { timeout: 5 }), /unknown option "timeout"/);
    await assert.rejects(client.stream('a b').next(), /jobId must be a job id/);
  } finally {
    await client.close();
  }
});

test('the client refuses bad settings', async () => {
  assert.throws(() => new Client({ keyPrefix: 'llm prefix' }), /keyPrefix/);
  assert.throws(() => new Client({ queues: { chats: 'x' } }), /unknown queue "chats"/);
  assert.throws(() => new Client({ url: 'redis://x', redis: {} }), /either redis/);
  assert.throws(() => new Client({ redis: {} }), /ioredis connection/);
  assert.throws(() => new Client({ host: 'x' }), /unknown option "host"/);
  // ioredis would prefix the queue names too, and no worker would ever see the jobs.
  assert.throws(
    () => new Client({ url: 'redis://127.0.0.1:1/0', redisOptions: { lazyConnect: true, keyPrefix: 'app:' } }),
    /keyPrefix/,
  );
});

test('a closed client refuses calls', async () => {
  const client = offline();
  await client.close();
  await assert.rejects(client.submit('chat', chat), /closed/);
});
