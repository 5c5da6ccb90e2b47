// Types of @llm-worker/client. The wire contract they describe is llm-worker's docs/protocol.md.
import type { Redis, RedisOptions } from 'ioredis';

export type JobType = 'chat' | 'generate' | 'embeddings' | 'batch';

/** The queue names: the hosts' QUEUE_CHAT_NAME, QUEUE_EMBEDDINGS_NAME, QUEUE_BATCH_NAME, QUEUE_PRIORITY_NAME. */
export interface Queues {
  chat: string;
  embeddings: string;
  batch: string;
  priority: string;
}

export const DEFAULT_QUEUES: Readonly<Queues>;
export const JOB_TYPES: readonly JobType[];

export interface ClientOptions {
  /** An ioredis connection to use (the caller's: close() leaves it open). Not with url or redisOptions. */
  redis?: Redis;
  /** Redis URL; default: the REDIS_URL environment variable, else redis://127.0.0.1:6379/0. */
  url?: string;
  /** Further ioredis options for the connection made from url (TLS, sentinels, ...). No keyPrefix. */
  redisOptions?: RedisOptions;
  /** The hosts' REDIS_KEY_PREFIX (default "llm:"): results, done markers and streams are under it. */
  keyPrefix?: string;
  /** Queue names, where the hosts' settings differ from the defaults (llm-chat, ...). */
  queues?: Partial<Queues>;
  /** The job's userId when submit() names none (default "llm-worker-client"). */
  userId?: string;
}

export interface SubmitOptions {
  /** The model; the host's DEFAULT_CHAT_MODEL or DEFAULT_EMBEDDING_MODEL when absent. */
  model?: string;
  /** The job's id (1 to 128 of [A-Za-z0-9._:-]); a random UUID when absent. */
  id?: string;
  /** Who asked, for results, logs and events (1 to 256 characters); the client's userId when absent. */
  userId?: string;
  /** An integer from -1,000,000 to 1,000,000, kept in events. Precedence comes from the priority queue (queue). */
  priority?: number;
  /** Copied into the result, logs and events (up to 256 characters). */
  correlationId?: string;
  /** The job's `timeout`: milliseconds for the whole job, capped by the host's WORKER_TIMEOUT. */
  timeoutMs?: number;
  /** Retries allowed, capped by the host's QUEUE_MAX_ATTEMPTS - 1. */
  maxRetries?: number;
  /** Sets request.stream (on a copy of the request): the text comes on the job's stream as it is made. */
  stream?: boolean;
  /** The list to push to; default: the type's queue (chat and generate: queues.chat). E.g. client.queues.priority. */
  queue?: string;
  /** Push at the serving end (RPUSH), to be taken next; default false (LPUSH: first in, first out). */
  urgent?: boolean;
  /**
   * Hold the job this many milliseconds in the delayed set (llm:delayed) before it is queued, at the
   * serving end, as retries are. Its createdAt is when it is due. Producer's and hosts' clocks should agree.
   */
  delayMs?: number;
  /** Wait (Redis WAIT) until this many replicas hold the push; NotReplicated when fewer did in time. */
  replicas?: number;
  /** How long to wait for the replicas (default 1000). */
  replicaTimeoutMs?: number;
  /** Further job fields (protocol additions); may not replace the fields the options above set. */
  extra?: Record<string, unknown>;
}

export interface TimeoutOptions {
  /** Milliseconds (default 300000). */
  timeoutMs?: number;
}

export interface ChatMessage {
  role: 'system' | 'user' | 'assistant' | 'tool' | (string & {});
  content?: string;
  thinking?: string;
  images?: string[];
  tool_calls?: unknown[];
  tool_name?: string;
}

export type Think = boolean | 'low' | 'medium' | 'high' | 'max';

export interface ChatRequest {
  messages: ChatMessage[];
  options?: Record<string, unknown>;
  stream?: boolean;
  format?: 'json' | Record<string, unknown>;
  tools?: unknown[];
  think?: Think;
  keepAlive?: string | number;
}

export interface GenerateRequest {
  prompt: string;
  system?: string;
  images?: string[];
  options?: Record<string, unknown>;
  stream?: boolean;
  format?: 'json' | Record<string, unknown>;
  think?: Think;
  keepAlive?: string | number;
}

export interface EmbeddingsRequest {
  input?: string | string[];
  /** The older single-text form. */
  prompt?: string;
  truncate?: boolean;
  dimensions?: number;
  options?: Record<string, unknown>;
  keepAlive?: string | number;
}

export interface BatchRequest {
  requests: Array<
    | { type: 'chat'; model?: string; request: ChatRequest }
    | { type: 'generate'; model?: string; request: GenerateRequest }
    | { type: 'embeddings'; model?: string; request: EmbeddingsRequest }
  >;
}

export interface RequestOf {
  chat: ChatRequest;
  generate: GenerateRequest;
  embeddings: EmbeddingsRequest;
  batch: BatchRequest;
}

export type ErrorType =
  | 'validation'
  | 'model'
  | 'timeout'
  | 'memory'
  | 'network'
  | 'provider'
  | 'rate_limit'
  | 'crashed'
  | 'unknown';

/** A job's result (docs/protocol.md, "Its result"): success or failure, exactly one per job. */
export interface JobResult {
  jobId: string;
  success: boolean;
  /**
   * chat: {message: {role, content, thinking?}, doneReason}; generate: {response, thinking?, doneReason};
   * embeddings: {embeddings: number[][]}; batch: {results: JobResult[]}. Null on failure.
   */
  response: Record<string, any> | null;
  error: string | null;
  errorType: ErrorType | null;
  processingTime: number;
  queueTime: number | null;
  model: string;
  requestedModel?: string;
  tokensUsed?: number | null;
  promptTokens?: number | null;
  completionTokens?: number | null;
  retryCount: number;
  fallbackUsed: boolean;
  cacheHit: boolean;
  workerId?: string;
  correlationId?: string | null;
  startedAt?: string;
  completedAt?: string;
  [field: string]: unknown;
}

/** An entry of a job's stream: a piece of text (and of reasoning, for thinking models), or a reset. */
export type StreamChunk = { type: 'chunk'; content: string; thinking?: string } | { type: 'reset' };

export class Client {
  constructor(options?: ClientOptions);
  /** The queue names in use. */
  readonly queues: Readonly<Queues>;
  readonly keyPrefix: string;
  /** The connection submit() and result() use (blocking calls use connections of their own). */
  readonly redis: Redis;
  /** Queue a job; resolves to its id. Throws TypeError or RangeError, naming the option, on bad input. */
  submit<T extends JobType>(type: T, request: RequestOf[T], options?: SubmitOptions): Promise<string>;
  /** The job's result if it has one, else null (one GET; no waiting). */
  result(jobId: string): Promise<JobResult | null>;
  /** The job's result (success or failure) once it has one; null after timeoutMs. BLPOP, then GET. */
  wait(jobId: string, options?: TimeoutOptions): Promise<JobResult | null>;
  /**
   * A streaming job's text as it comes; "\f" when the job starts over (drop what was shown). Ends after
   * the done entry; throws JobFailed on an error entry (or a failure without a stream), StreamTimeout after timeoutMs.
   */
  stream(jobId: string, options?: TimeoutOptions): AsyncGenerator<string, void, undefined>;
  /** As stream(), entry by entry, with the reasoning of thinking models. */
  chunks(jobId: string, options?: TimeoutOptions): AsyncGenerator<StreamChunk, void, undefined>;
  /** Close the connections the client opened; one given as `redis` stays open. */
  close(): Promise<void>;
}

export class JobFailed extends Error {
  constructor(result: JobResult);
  readonly name: 'JobFailed';
  readonly result: JobResult;
  readonly jobId: string;
  readonly errorType: ErrorType | null;
}

export class NotReplicated extends Error {
  constructor(jobId: string, wanted: number, confirmed: number);
  readonly name: 'NotReplicated';
  readonly jobId: string;
  readonly wanted: number;
  readonly confirmed: number;
}

export class StreamTimeout extends Error {
  constructor(jobId: string, timeoutMs: number);
  readonly name: 'StreamTimeout';
  readonly jobId: string;
  readonly timeoutMs: number;
}
