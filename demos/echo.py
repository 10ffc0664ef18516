"""echo-test: an offline MCP server whose tools exercise the gateway's edge cases.

`echo` is the plain call, `slow_count` streams progress notifications (an SSE
response), `fail` returns `isError: true` (a refund case) and `sleep` outlasts
timeouts.
"""

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

MAX_STEPS = 100
MAX_DELAY_MS = 10_000
MAX_SLEEP_SECONDS = 300.0


def create_server() -> MCPServer:
    """A fresh echo-test server (each app needs its own: a session manager runs only once)."""
    server = MCPServer("echo-test", instructions="Offline test tools: echo, slow_count (progress), fail, sleep.")

    @server.tool()
    def echo(text: str) -> str:
        """Return `text` unchanged."""
        return text

    @server.tool()
    async def slow_count(ctx: Context, steps: int = 5, delay_ms: int = 200) -> str:
        """Count to `steps`, waiting `delay_ms` before each step and reporting it as progress."""
        if not 1 <= steps <= MAX_STEPS:
            raise ToolError(f"steps must be between 1 and {MAX_STEPS}")
        if not 0 <= delay_ms <= MAX_DELAY_MS:
            raise ToolError(f"delay_ms must be between 0 and {MAX_DELAY_MS}")
        for step in range(1, steps + 1):
            await anyio.sleep(delay_ms / 1000)
            await ctx.report_progress(step, steps, f"step {step}/{steps}")
        return f"counted to {steps}"

    @server.tool()
    def fail(message: str = "this tool always fails") -> str:
        """Fail on purpose: the result comes back with `isError: true` and `message` as its text."""
        raise ToolError(message)

    @server.tool()
    async def sleep(seconds: float) -> str:
        """Sleep `seconds` (at most 300) and return, to try out timeouts."""
        if not 0 <= seconds <= MAX_SLEEP_SECONDS:
            raise ToolError(f"seconds must be between 0 and {MAX_SLEEP_SECONDS:g}")
        await anyio.sleep(seconds)
        return f"slept {seconds:g}s"

    return server
