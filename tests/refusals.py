"""Reading the gateway's refusals in tests, whichever form they take."""

from __future__ import annotations

import json
from typing import Any

from addon.errors import rpc_code


def refusal(answer: Any) -> dict[str, Any]:
    """A refusal's fields: the plain body, or a JSON-RPC error's `data` with its `message`.

    `answer` is a body (bytes) or anything with `.content` (a mitmproxy or httpx response).
    """
    body = json.loads(answer if isinstance(answer, bytes) else answer.content)
    if "jsonrpc" not in body:
        return body
    assert set(body) == {"jsonrpc", "id", "error"} and body["jsonrpc"] == "2.0"
    error = body["error"]
    assert error["code"] == rpc_code(error["data"]["error"]) and error["message"]
    return {**error["data"], "message": error["message"]}
