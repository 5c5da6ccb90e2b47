'use strict';
/**
 * @llm-worker/client: a producer for llm-worker, in Node.
 *
 * It speaks the wire protocol of docs/protocol.md and nothing more: LPUSH a
 * job onto its queue, BLPOP its done marker, GET its result, XREAD its chunk
 * stream. It mirrors the Python client (llm_worker/queue/client.py): the same
 * job fields, defaults and waiting rules, so the two behave alike.
 *
 * CommonJS with named exports, so that both `require('@llm-worker/client')`
 * and `import { Client } from '@llm-worker/client'` work without a build step.
 */

const crypto = require('node:crypto');
const Redis = require('ioredis');

const TYPES = ['chat', 'generate', 'embeddings', 'batch'];
// The patterns the workers check (llm_worker/protocol/jobs.py, settings/config.py): refused here first,
// so that a bad job fails in the producer's hands, with its reason, and not as a dead letter later.
const JOB_ID = /^[A-Za-z0-9._:-]{1,128}$/;
const MODEL_NAME = /^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,254}$/;
const QUEUE_NAME = /^[A-Za-z0-9][A-Za-z0-9._:{}-]{0,127}$/;
const KEY_PREFIX = /^[A-Za-z0-9._:{}-]{1,32}$/;
const USER_ID = /^[\s\S]{1,256}$/;
const PRIORITY_LIMIT = 1_000_000;
const DEFAULT_QUEUES = Object.freeze({
  chat: 'llm-chat',
  embeddings: 'llm-embeddings',
  batch: 'llm-batch',
  priority: 'llm-priority',
});
const DEFAULT_TIMEOUT_MS = 300_000; // as the Python client's wait() and stream()
const WAIT_TURN_MS = 5_000; // each BLPOP blocks at most this long, then the result key is looked at (see wait)
const STREAM_TURN_MS = 1_000; // each XREAD blocks at most this long, then the result is looked at (see chunks)
const STREAM_COUNT = 256;
const IDLE_BLOCKERS = 4; // blocking connections kept for reuse; more are opened when more calls block at once

const SUBMIT_OPTIONS = new Set([
  'model',
  'id',
  'userId',
  'priority',
  'correlationId',
  'timeoutMs',
  'maxRetries',
  'stream',
  'queue',
  'urgent',
  'delayMs',
  'replicas',
  'replicaTimeoutMs',
  'extra',
]);
const CLIENT_OPTIONS = new Set(['redis', 'url', 'redisOptions', 'keyPrefix', 'queues', 'userId']);
// Fields the client writes itself; `extra` may not replace them (use the named options).
const OWN_FIELDS = new Set([
  'id',
  'type',
  'userId',
  'model',
  'request',
  'priority',
  'correlationId',
  'createdAt',
  'timeout',
  'retryCount',
  'maxRetries',
]);

/** The job ended in failure: `result` is its failure result (errorType, error, ...). */
class JobFailed extends Error {
  constructor(result) {
    super(`${result.errorType}: ${result.error}`);
    this.name = 'JobFailed';
    this.result = result;
    this.jobId = result.jobId;
    this.errorType = result.errorType;
  }
}

/**
 * The job was pushed, but fewer replicas than asked confirmed it in time. It is
 * queued on the master and runs if the master stays up; submitting it again may
 * run it twice (see the Python client's NotReplicated).
 */
class NotReplicated extends Error {
  constructor(jobId, wanted, confirmed) {
    super(`job ${jobId} reached ${confirmed} of ${wanted} replicas`);
    this.name = 'NotReplicated';
    this.jobId = jobId;
    this.wanted = wanted;
    this.confirmed = confirmed;
  }
}

/** A stream did not end (no done or error entry) within its timeout. */
class StreamTimeout extends Error {
  constructor(jobId, timeoutMs) {
    super(`no end of stream for job ${jobId} within ${timeoutMs} ms`);
    this.name = 'StreamTimeout';
    this.jobId = jobId;
    this.timeoutMs = timeoutMs;
  }
}

// ---- validation: messages name the option and what it should be, never the request's text ----

function describe(value) {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  if (typeof value === 'string') return `a string of ${value.length} characters`;
  return typeof value === 'object' ? 'an object' : `${typeof value} ${String(value)}`;
}

function isPlainObject(value) {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) return false;
  const proto = Object.getPrototypeOf(value);
  return proto === Object.prototype || proto === null;
}

function checkInteger(name, value, min, max) {
  if (!Number.isSafeInteger(value) || value < min || value > max) {
    throw new RangeError(`${name} must be an integer from ${min} to ${max}, not ${describe(value)}`);
  }
  return value;
}

function checkPattern(name, value, pattern, what) {
  if (typeof value !== 'string' || !pattern.test(value)) {
    // A name or id is not prompt text, but it is quoted only when short and plain.
    const shown = typeof value === 'string' && value.length <= 64 && /^[\x20-\x7e]*$/.test(value);
    throw new TypeError(`${name} must be ${what}, not ${shown ? JSON.stringify(value) : describe(value)}`);
  }
  return value;
}

function checkOptions(where, options, allowed) {
  if (options === undefined) return {};
  if (!isPlainObject(options)) throw new TypeError(`${where}: options must be an object, not ${describe(options)}`);
  for (const key of Object.keys(options)) {
    if (!allowed.has(key)) {
      throw new TypeError(`${where}: unknown option ${JSON.stringify(key)} (known: ${[...allowed].join(', ')})`);
    }
  }
  return options;
}

function checkTimeout(where, options) {
  const { timeoutMs = DEFAULT_TIMEOUT_MS } = checkOptions(where, options, new Set(['timeoutMs']));
  return checkInteger(`${where}: timeoutMs`, timeoutMs, 0, 30 * 86_400_000);
}

// The request's shape, as far as a producer can check it without the host's limits (those are the
// workers' to apply: MAX_PROMPT_LENGTH, MAX_MESSAGES, ...; they answer with a `validation` error).
function checkRequest(type, request) {
  if (!isPlainObject(request)) throw new TypeError(`request must be an object, not ${describe(request)}`);
  if (type === 'chat') {
    if (!Array.isArray(request.messages) || request.messages.length === 0) {
      throw new TypeError('a chat request needs messages: a non-empty array of {role, content}');
    }
    request.messages.forEach((message, i) => {
      if (!isPlainObject(message) || typeof message.role !== 'string') {
        throw new TypeError(`request.messages[${i}] must be an object with a role`);
      }
      if (message.content !== undefined && typeof message.content !== 'string') {
        throw new TypeError(`request.messages[${i}].content must be a string, not ${describe(message.content)}`);
      }
    });
  } else if (type === 'generate') {
    if (typeof request.prompt !== 'string') {
      throw new TypeError(`a generate request needs prompt: a string, not ${describe(request.prompt)}`);
    }
  } else if (type === 'embeddings') {
    const { input, prompt } = request;
    const texts = input === undefined ? prompt : input;
    const ok =
      typeof texts === 'string' ||
      (input !== undefined && Array.isArray(texts) && texts.length > 0 && texts.every((t) => typeof t === 'string'));
    if (!ok) throw new TypeError('an embeddings request needs input: a string or a non-empty array of strings');
  } else if (type === 'batch') {
    if (!Array.isArray(request.requests) || request.requests.length === 0) {
      throw new TypeError('a batch request needs requests: a non-empty array of {type, model, request}');
    }
    request.requests.forEach((item, i) => {
      if (!isPlainObject(item) || !['chat', 'generate', 'embeddings'].includes(item.type)) {
        throw new TypeError(`request.requests[${i}] must be an object whose type is chat, generate or embeddings`);
      }
      checkRequest(item.type, item.request);
    });
  }
}

function encode(job) {
  try {
    return JSON.stringify(job);
  } catch (err) {
    // JSON.stringify's own message may quote the request (a BigInt's value, a cycle's path): not repeated.
    throw new TypeError(`the job is not JSON-serialisable (${err && err.name}); requests hold JSON values only`);
  }
}

// Deadlines on the monotonic clock: a wall clock set back must not stretch a wait.
const now = () => performance.now();

/**
 * A producer: pushes jobs (submit), waits for results (wait), follows streams (stream, chunks).
 *
 *   const client = new Client({ url: 'redis://127.0.0.1:6379/0' });
 *   const id = await client.submit('chat', { messages: [{ role: 'user', content: 'Hi' }] }, { model: 'llama3.2' });
 *   const result = await client.wait(id, { timeoutMs: 60_000 }); // the result object, or null on timeout
 *   await client.close();
 */
class Client {
  constructor(options = {}) {
    checkOptions('Client', options, CLIENT_OPTIONS);
    const { redis, url, redisOptions, keyPrefix = 'llm:', queues = {}, userId = 'llm-worker-client' } = options;
    if (redis !== undefined && (url !== undefined || redisOptions !== undefined)) {
      throw new TypeError('Client: give either redis (a connection) or url/redisOptions, not both');
    }
    this.keyPrefix = checkPattern('Client: keyPrefix', keyPrefix, KEY_PREFIX, 'up to 32 of [A-Za-z0-9._:{}-]');
    if (!isPlainObject(queues)) throw new TypeError(`Client: queues must be an object, not ${describe(queues)}`);
    for (const key of Object.keys(queues)) {
      if (!(key in DEFAULT_QUEUES)) throw new TypeError(`Client: unknown queue ${JSON.stringify(key)} in queues`);
      checkPattern(`Client: queues.${key}`, queues[key], QUEUE_NAME, 'a queue name (QUEUE_*_NAME)');
    }
    this.queues = Object.freeze({ ...DEFAULT_QUEUES, ...queues });
    this.userId = checkPattern('Client: userId', userId, USER_ID, '1 to 256 characters');
    if (redis !== undefined) {
      if (!redis || typeof redis.duplicate !== 'function' || typeof redis.lpush !== 'function') {
        throw new TypeError('Client: redis must be an ioredis connection (new Redis(...))');
      }
      this.ownsRedis = false;
      this.redis = redis;
    } else {
      const where = url === undefined ? process.env.REDIS_URL || 'redis://127.0.0.1:6379/0' : url;
      if (typeof where !== 'string') throw new TypeError(`Client: url must be a string, not ${describe(where)}`);
      if (redisOptions !== undefined && !isPlainObject(redisOptions)) {
        throw new TypeError(`Client: redisOptions must be an object, not ${describe(redisOptions)}`);
      }
      if (redisOptions && redisOptions.keyPrefix) {
        throw new TypeError("Client: redisOptions has a keyPrefix; give it as the Client's keyPrefix instead");
      }
      this.ownsRedis = true;
      this.redis = new Redis(where, { ...redisOptions });
      // Failures reach the caller as rejected commands; without a listener ioredis would also print each.
      this.redis.on('error', () => {});
    }
    if (this.redis.options && this.redis.options.keyPrefix) {
      // ioredis would prefix every key, queue names included, and no worker would see the jobs.
      throw new TypeError("Client: the ioredis connection has a keyPrefix; give it as the Client's keyPrefix instead");
    }
    this.queueOf = {
      chat: this.queues.chat,
      generate: this.queues.chat,
      embeddings: this.queues.embeddings,
      batch: this.queues.batch,
    };
    this.idle = []; // blocking connections not in use
    this.blockers = new Set(); // every blocking connection open
    this.closed = false;
  }

  resultKey(jobId) {
    return `${this.keyPrefix}result:${jobId}`;
  }

  doneKey(jobId) {
    return `${this.keyPrefix}done:${jobId}`;
  }

  streamKey(jobId) {
    return `${this.keyPrefix}stream:${jobId}`;
  }

  get delayedKey() {
    return `${this.keyPrefix}delayed`;
  }

  /**
   * Queue a job; resolve to its id. See index.d.ts (SubmitOptions) for each option.
   * `urgent` puts it at the serving end (RPUSH); `delayMs` holds it in the delayed set until due.
   */
  async submit(type, request, options) {
    this.ensureOpen();
    if (!TYPES.includes(type)) throw new TypeError(`type must be one of ${TYPES.join(', ')}, not ${describe(type)}`);
    const o = checkOptions('submit', options, SUBMIT_OPTIONS);
    checkRequest(type, request);
    const id =
      o.id === undefined ? crypto.randomUUID() : checkPattern('id', o.id, JOB_ID, '1 to 128 of [A-Za-z0-9._:-]');
    const delayMs = o.delayMs === undefined ? 0 : checkInteger('delayMs', o.delayMs, 0, 30 * 86_400_000);
    if (o.urgent !== undefined && typeof o.urgent !== 'boolean') throw new TypeError('urgent must be a boolean');
    if (o.stream !== undefined && typeof o.stream !== 'boolean') throw new TypeError('stream must be a boolean');
    // A delayed job's createdAt is when it is due, so that its queueTime measures the wait in the queue.
    const due = Date.now() + delayMs; // the wall clock: hosts compare it with theirs
    const createdAt = new Date(due).toISOString();
    // `id` first: a payload too large for the host (MAX_JOB_BYTES) still gets its failure result by it.
    const job = {
      id,
      type,
      userId: o.userId === undefined ? this.userId : checkPattern('userId', o.userId, USER_ID, '1 to 256 characters'),
      request: o.stream === undefined ? request : { ...request, stream: o.stream },
      priority: o.priority === undefined ? 0 : checkInteger('priority', o.priority, -PRIORITY_LIMIT, PRIORITY_LIMIT),
      createdAt,
      retryCount: 0,
    };
    if (o.model !== undefined) job.model = checkPattern('model', o.model, MODEL_NAME, "a model's name");
    if (o.correlationId !== undefined) {
      if (typeof o.correlationId !== 'string' || o.correlationId.length > 256) {
        throw new TypeError(`correlationId must be a string of up to 256 characters, not ${describe(o.correlationId)}`);
      }
      job.correlationId = o.correlationId;
    }
    if (o.timeoutMs !== undefined) job.timeout = checkInteger('timeoutMs', o.timeoutMs, 1, 86_400_000);
    if (o.maxRetries !== undefined) job.maxRetries = checkInteger('maxRetries', o.maxRetries, 0, 100);
    if (o.extra !== undefined) {
      if (!isPlainObject(o.extra)) throw new TypeError(`extra must be an object, not ${describe(o.extra)}`);
      for (const key of Object.keys(o.extra)) {
        if (OWN_FIELDS.has(key)) throw new TypeError(`extra may not set ${key}: use the option of that name`);
        job[key] = o.extra[key];
      }
    }
    const queue =
      o.queue === undefined ? this.queueOf[type] : checkPattern('queue', o.queue, QUEUE_NAME, 'a queue name');
    const replicas = o.replicas === undefined ? 0 : checkInteger('replicas', o.replicas, 0, 100);
    const replicaTimeoutMs =
      o.replicaTimeoutMs === undefined ? 1000 : checkInteger('replicaTimeoutMs', o.replicaTimeoutMs, 0, 3_600_000);
    const payload = encode(job);
    if (delayMs > 0) {
      // The delayed set holds "<queue>\n<job>" scored by the due time in ms; a host's supervisor moves it
      // to the serving end of its queue when due (docs/protocol.md, Keys: llm:delayed), as for retries.
      await this.redis.zadd(this.delayedKey, due, `${queue}\n${payload}`);
    } else if (o.urgent) {
      await this.redis.rpush(queue, payload);
    } else {
      await this.redis.lpush(queue, payload);
    }
    if (replicas > 0) {
      const confirmed = Number(await this.redis.call('WAIT', String(replicas), String(replicaTimeoutMs)));
      if (confirmed < replicas) throw new NotReplicated(id, replicas, confirmed);
    }
    return id;
  }

  /** The job's result if it has one (GET), else null. */
  async result(jobId) {
    this.ensureOpen();
    checkPattern('jobId', jobId, JOB_ID, 'a job id');
    return this.readResult(jobId);
  }

  async readResult(jobId) {
    const blob = await this.redis.get(this.resultKey(jobId));
    return blob === null ? null : JSON.parse(blob);
  }

  /**
   * Resolve to the job's result (success or failure) once it has one, or to null after timeoutMs.
   * BLPOP on the done marker, then GET the result, as docs/protocol.md says.
   */
  async wait(jobId, options) {
    this.ensureOpen();
    checkPattern('jobId', jobId, JOB_ID, 'a job id');
    const timeoutMs = checkTimeout('wait', options);
    const found = await this.readResult(jobId);
    if (found !== null) return found;
    const deadline = now() + timeoutMs;
    const conn = this.acquire();
    try {
      for (;;) {
        const left = deadline - now();
        if (left <= 0) return null;
        // Short turns, because the marker is one list element: when two callers wait on one job, one
        // pops it and the other sees the result appear instead. BLPOP's timeout 0 would block forever,
        // hence at least 10 ms.
        const seconds = Math.max(10, Math.min(left, WAIT_TURN_MS)) / 1000;
        const popped = await conn.blpop(this.doneKey(jobId), seconds.toFixed(3));
        if (popped !== null || (await this.redis.exists(this.resultKey(jobId)))) {
          return this.readResult(jobId);
        }
      }
    } finally {
      this.release(conn);
    }
  }

  /**
   * A streaming job's entries as they come: {type: 'chunk', content, thinking?} and {type: 'reset'}.
   * Ends after the done entry; throws JobFailed on an error entry, StreamTimeout after timeoutMs.
   */
  async *chunks(jobId, options) {
    this.ensureOpen();
    checkPattern('jobId', jobId, JOB_ID, 'a job id');
    const timeoutMs = checkTimeout('stream', options);
    const key = this.streamKey(jobId);
    const deadline = now() + timeoutMs;
    let last = '0-0';
    const conn = this.acquire();
    try {
      while (now() < deadline) {
        // XREAD's BLOCK 0 would block forever, hence at least 1 ms.
        const block = Math.max(1, Math.min(STREAM_TURN_MS, deadline - now()));
        const reply = await conn.xread('COUNT', STREAM_COUNT, 'BLOCK', block, 'STREAMS', key, last);
        if (reply === null) {
          // Nothing new. A job with a result and no stream never streamed (it did not ask to, or it
          // ended before anyone looked and its stream is gone): nothing more will come.
          const result = await this.readResult(jobId);
          if (result !== null && !(await this.redis.exists(key))) {
            if (!result.success) throw new JobFailed(result);
            return;
          }
          continue;
        }
        for (const [entryId, flat] of reply[0][1]) {
          last = entryId;
          const fields = {};
          for (let i = 0; i + 1 < flat.length; i += 2) fields[flat[i]] = flat[i + 1];
          if (fields.event === 'chunk') {
            const piece = { type: 'chunk', content: fields.content || '' };
            if (fields.thinking) piece.thinking = fields.thinking;
            yield piece;
          } else if (fields.event === 'reset') {
            yield { type: 'reset' };
          } else if (fields.event === 'done') {
            return;
          } else if (fields.event === 'error') {
            // The error entry and the result are written in one transaction: the result is there.
            const result = (await this.readResult(jobId)) || {
              jobId,
              success: false,
              error: fields.error || '',
              errorType: 'unknown',
            };
            throw new JobFailed(result);
          }
          // Other events are additions a reader may ignore (docs/protocol.md: compatible additions).
        }
      }
      throw new StreamTimeout(jobId, timeoutMs);
    } finally {
      this.release(conn);
    }
  }

  /**
   * A streaming job's text as it comes: each chunk's content (thinking is left out; see chunks), and
   * "\f" when the job starts over on another worker (a reset): drop what was shown and start again.
   */
  async *stream(jobId, options) {
    for await (const piece of this.chunks(jobId, options)) {
      if (piece.type === 'reset') yield '\f';
      else if (piece.content) yield piece.content;
    }
  }

  /** Close the client's connections: its own, and the blocking ones; a connection given as `redis` stays open. */
  async close() {
    if (this.closed) return;
    this.closed = true;
    for (const conn of this.blockers) conn.disconnect(); // a pending BLPOP or XREAD rejects
    this.blockers.clear();
    this.idle = [];
    if (this.ownsRedis) {
      if (this.redis.status === 'wait' || this.redis.status === 'end') {
        this.redis.disconnect(); // never connected (lazyConnect): QUIT would connect first
      } else {
        try {
          await this.redis.quit();
        } catch {
          this.redis.disconnect();
        }
      }
    }
  }

  ensureOpen() {
    if (this.closed) throw new Error('the client is closed');
  }

  // Blocking commands (BLPOP, XREAD BLOCK) hold their connection until they return, so each runs on a
  // connection of its own, never on the one submit uses; connections are reused once free.
  acquire() {
    const conn = this.idle.pop();
    if (conn) return conn;
    const made = this.redis.duplicate({
      commandTimeout: undefined, // the caller's, if any, is shorter than a blocking turn
      // A blocking call on a connection that died silently gives up a while past its own timeout,
      // so that wait() and stream() keep their deadlines whatever happens to the network.
      blockingTimeout: 60_000,
      blockingTimeoutGrace: 5_000,
      lazyConnect: false,
    });
    made.on('error', () => {});
    this.blockers.add(made);
    return made;
  }

  release(conn) {
    if (!this.closed && this.idle.length < IDLE_BLOCKERS && conn.status !== 'end') {
      this.idle.push(conn);
    } else {
      this.blockers.delete(conn);
      conn.disconnect();
    }
  }
}

exports.Client = Client;
exports.JobFailed = JobFailed;
exports.NotReplicated = NotReplicated;
exports.StreamTimeout = StreamTimeout;
exports.DEFAULT_QUEUES = DEFAULT_QUEUES;
exports.JOB_TYPES = Object.freeze([...TYPES]);
