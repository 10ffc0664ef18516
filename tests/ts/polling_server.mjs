// A server built like the TypeScript SDK's ssePollingExample (see example_server.mjs), with the same SDK
// pieces: McpServer, the SDK's Express app, StreamableHTTPServerTransport with the example's
// InMemoryEventStore and a retry interval, one transport per session. Its tools let a test choose the
// timings the example fixes:
//   late-task {closeAfterMs, answerAfterMs}: the example's `long-task` shape (progress, closeSSEStream(),
//     the answer later, for the client to fetch by GET + Last-Event-ID);
//   slow {ms}: answers on its POST stream after `ms`, unless the client cancels it first (the SDK then
//     aborts the handler and sends no answer).
//
// Usage: node polling_server.mjs [--retry-ms N]   (default 2000, as the example)
// It prints one JSON line {"url": ...} once listening on a free port, then a JSON line per thing the
// test checks: {"event": "answered", ...} when a tool returns, {"event": "cancelled", ...} when the SDK
// aborts a tool on notifications/cancelled. It stops on SIGTERM or when its stdin closes.
import { randomUUID } from 'node:crypto';
import { parseArgs } from 'node:util';
import { McpServer } from '@modelcontextprotocol/sdk/server/mcp.js';
import { createMcpExpressApp } from '@modelcontextprotocol/sdk/server/express.js';
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';
import { isInitializeRequest } from '@modelcontextprotocol/sdk/types.js';
import { InMemoryEventStore } from '@modelcontextprotocol/sdk/examples/shared/inMemoryEventStore.js';
import { z } from 'zod';

const { values: opts } = parseArgs({ options: { 'retry-ms': { type: 'string', default: '2000' } } });
const retryInterval = Number(opts['retry-ms']);

const report = record => process.stdout.write(JSON.stringify(record) + '\n');
const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));

function watchCancellation(tool, extra) {
    extra.signal.addEventListener('abort', () =>
        report({ event: 'cancelled', tool, sessionId: extra.sessionId, requestId: extra.requestId, reason: String(extra.signal.reason) }));
}

function answered(tool, extra, text) {
    report({ event: 'answered', tool, sessionId: extra.sessionId, requestId: extra.requestId, aborted: extra.signal.aborted });
    return { content: [{ type: 'text', text }] };
}

const getServer = () => {
    const server = new McpServer({ name: 'sse-polling-example', version: '1.0.0' }, { capabilities: { logging: {} } });
    // Progress on the call's own stream (related to its request), so it is stored with that stream's events
    // and replayed on its resume; the example logs session-wide instead (the standalone GET stream).
    const progress = (extra, data) => extra.sendNotification({ method: 'notifications/message', params: { level: 'info', data } });

    server.tool('late-task', 'long-task with its timings chosen by the caller', {
        closeAfterMs: z.number().int().min(0),
        answerAfterMs: z.number().int().min(0)
    }, async ({ closeAfterMs, answerAfterMs }, extra) => {
        watchCancellation('late-task', extra);
        await progress(extra, 'late-task: started');
        await sleep(closeAfterMs);
        extra.closeSSEStream?.();
        await sleep(answerAfterMs);
        await progress(extra, 'late-task: answering');
        return answered('late-task', extra, `late-task answered after ${closeAfterMs + answerAfterMs} ms`);
    });

    server.tool('slow', 'Answers on its POST stream after `ms`', { ms: z.number().int().min(0) }, async ({ ms }, extra) => {
        watchCancellation('slow', extra);
        await progress(extra, 'slow: started');
        await sleep(ms);
        return answered('slow', extra, `slow answered after ${ms} ms`);
    });
    return server;
};

// As the example: one transport and server per session, sharing one event store.
const app = createMcpExpressApp({ host: '127.0.0.1' });
const eventStore = new InMemoryEventStore();
const transports = new Map();

app.all('/mcp', async (req, res) => {
    const sessionId = req.headers['mcp-session-id'];
    const known = sessionId ? transports.get(sessionId) : undefined;
    if (known) {
        await known.handleRequest(req, res, req.body);
        return;
    }
    if (sessionId || !isInitializeRequest(req.body)) {
        res.status(sessionId ? 404 : 400).json({ jsonrpc: '2.0', error: { code: -32000, message: 'No valid session' }, id: null });
        return;
    }
    const transport = new StreamableHTTPServerTransport({
        sessionIdGenerator: () => randomUUID(),
        eventStore,
        retryInterval,
        onsessioninitialized: id => transports.set(id, transport)
    });
    transport.onclose = () => transports.delete(transport.sessionId);
    await getServer().connect(transport);
    await transport.handleRequest(req, res, req.body);
});

const listener = app.listen(0, '127.0.0.1', () => report({ url: `http://127.0.0.1:${listener.address().port}/mcp` }));
const stop = () => {
    for (const transport of transports.values()) transport.close().catch(() => {});
    listener.close();
    listener.closeAllConnections?.();
    process.exit(0);
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
process.stdin.on('end', stop).resume();
