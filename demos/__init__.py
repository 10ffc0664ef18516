"""Reference MCP servers for trying mcpmeter locally.

Five small servers built on the official `mcp` SDK (`MCPServer`), served over
streamable HTTP from one process (`python -m demos`); see `demos.app`.
`demos.fake_apis` stands in for the public APIs four of them wrap, for offline use.
"""
