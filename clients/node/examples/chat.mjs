// A chat job waited for, then one streamed: REDIS_URL=redis://127.0.0.1:6379/0 node examples/chat.mjs
import { Client } from '@llm-worker/client';

const model = process.env.LLM_MODEL || 'llama3.2';
const client = new Client({ url: process.env.REDIS_URL, userId: 'example' });
try {
  const id = await client.submit('chat', { messages: [{ role: 'user', content: 'Why is the sky blue?' }] }, { model });
  const result = await client.wait(id, { timeoutMs: 120_000 }); // null if no answer in time
  if (result === null) throw new Error(`no result for job ${id} in time`);
  if (!result.success) throw new Error(`job ${id} failed: ${result.errorType}: ${result.error}`);
  console.log(result.response.message.content);

  const streamed = await client.submit(
    'chat',
    { messages: [{ role: 'user', content: 'Tell me more' }] },
    { model, stream: true },
  );
  for await (const text of client.stream(streamed, { timeoutMs: 120_000 })) {
    // "\f": the job started over on another worker; a screen would clear what it showed.
    process.stdout.write(text === '\f' ? '\n[restarted]\n' : text);
  }
  process.stdout.write('\n');
} finally {
  await client.close();
}
