// The TypeScript SDK's client (Client + StreamableHTTPClientTransport, pinned by tests/ts/package.json) calling
// tools through the gateway, one session, calls in order; it prints one JSON line for the test to check.
//
// Usage: MCPMETER_KEY=<api key> node client.mjs <url> '<calls>'
//   calls: a JSON list of {"tool": name, "args": {...}, "timeoutMs": n?, "abortAfterMs": n?, "abortReason": s?}
//   timeoutMs is the SDK's request timeout (it then sends notifications/cancelled); abortAfterMs aborts
//   the call's AbortSignal (the same notification, with abortReason).
// Output: {"protocolVersion", "sessionId", "calls": [{tool, ok, text?, error?: {code, message},
//   messages: [log data received during the call], tokens: [event ids seen on the call's streams]}],
//   "http": [{method, lastEventId, status}]}. Exit status 2 with a one-line message if it cannot run.
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { LoggingMessageNotificationSchema } from '@modelcontextprotocol/sdk/types.js';

const [url, plan] = process.argv.slice(2);
if (!url || !plan || !process.env.MCPMETER_KEY) {
    console.error('usage: MCPMETER_KEY=<key> node client.mjs <url> <calls as JSON>');
    process.exit(2);
}

// Every HTTP request the transport makes, to show how it reached the answer (POST, then GET + Last-Event-ID).
const http = [];
let posting = 0; // POSTs awaiting their response headers (a cancellation is sent without being awaited)
const recordingFetch = async (input, init) => {
    const headers = new Headers(init?.headers);
    const entry = { method: init?.method ?? 'GET', lastEventId: headers.get('last-event-id'), status: null };
    http.push(entry);
    if (entry.method === 'POST') posting++;
    try {
        const response = await fetch(input, init);
        entry.status = response.status;
        return response;
    } finally {
        if (entry.method === 'POST') posting--;
    }
};

const transport = new StreamableHTTPClientTransport(new URL(url), {
    fetch: recordingFetch,
    requestInit: { headers: { Authorization: `Bearer ${process.env.MCPMETER_KEY}` } },
    // Resume promptly and keep trying: the server's retry interval (its priming event) sets the delay.
    reconnectionOptions: { initialReconnectionDelay: 200, maxReconnectionDelay: 2000, reconnectionDelayGrowFactor: 1.5, maxRetries: 5 }
});
const client = new Client({ name: 'mcpmeter-ts-e2e', version: '1.0.0' });
let messages = [];
client.setNotificationHandler(LoggingMessageNotificationSchema, n => messages.push(String(n.params.data)));

async function run(spec) {
    messages = [];
    const tokens = [];
    const options = { onresumptiontoken: token => tokens.push(token) };
    if (spec.timeoutMs !== undefined) options.timeout = spec.timeoutMs;
    let timer;
    if (spec.abortAfterMs !== undefined) {
        const controller = new AbortController();
        options.signal = controller.signal;
        timer = setTimeout(() => controller.abort(spec.abortReason ?? 'aborted by the test client'), spec.abortAfterMs);
    }
    const outcome = { tool: spec.tool };
    try {
        const result = await client.callTool({ name: spec.tool, arguments: spec.args ?? {} }, undefined, options);
        Object.assign(outcome, { ok: !result.isError, text: result.content?.[0]?.text ?? null });
    } catch (error) {
        Object.assign(outcome, { ok: false, error: { code: error.code ?? null, message: String(error.message ?? error) } });
    } finally {
        clearTimeout(timer);
    }
    return Object.assign(outcome, { messages, tokens });
}

try {
    await client.connect(transport);
} catch (error) {
    console.error(`cannot connect to ${url}: ${error.message ?? error}`);
    process.exit(2);
}
const calls = [];
for (const spec of JSON.parse(plan)) calls.push(await run(spec));
// Let the last notifications/cancelled reach the gateway before the session goes (at most 5 s).
for (let waited = 0; posting > 0 && waited < 5000; waited += 50) await new Promise(resolve => setTimeout(resolve, 50));
const summary = { protocolVersion: transport.protocolVersion, sessionId: transport.sessionId, calls, http };
await client.close();
process.stdout.write(JSON.stringify(summary) + '\n');
process.exit(0);
