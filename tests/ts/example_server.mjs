// Runs the TypeScript SDK's own ssePollingExample (SEP-1699) as shipped in the pinned package, unchanged:
// node_modules/@modelcontextprotocol/sdk/dist/esm/examples/server/ssePollingExample.js, tool `long-task`
// (progress, then extra.closeSSEStream() at 50 %, the answer about a second later, retry interval 2 s).
// The example listens on port 3001 of every interface; this pins its listen() to a free port of 127.0.0.1
// and prints {"url": ...} as the first line of stdout (the example's own log lines follow).
// It stops on SIGTERM or when its stdin closes.
import http from 'node:http';

const listen = http.Server.prototype.listen;
http.Server.prototype.listen = function (...args) {
    const done = typeof args.at(-1) === 'function' ? args.at(-1) : undefined;
    this.once('listening', () => {
        process.stdout.write(JSON.stringify({ url: `http://127.0.0.1:${this.address().port}/mcp` }) + '\n');
        done?.();
    });
    return listen.call(this, 0, '127.0.0.1');
};
process.stdin.on('end', () => process.exit(0)).resume();
await import('@modelcontextprotocol/sdk/examples/server/ssePollingExample.js');
