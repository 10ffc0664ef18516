"""currency: currency conversion at the European Central Bank's reference rates (Frankfurter)."""

import re
from typing import TypedDict

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from demos.upstream import base_url, get_json

BASE_URL_ENV = "MCPMETER_DEMO_FRANKFURTER_URL"
DEFAULT_BASE_URL = "https://api.frankfurter.app"
CURRENCY_CODE = re.compile(r"[A-Z]{3}")


class Conversion(TypedDict):
    amount: float
    from_currency: str
    to_currency: str
    result: float
    rate: float
    date: str


def _currency_code(value: str, field: str) -> str:
    """`value` as an upper-case ISO 4217 code, or a `ToolError`."""
    code = value.strip().upper()
    if not CURRENCY_CODE.fullmatch(code):
        raise ToolError(f"{field} must be a 3-letter currency code such as EUR or USD, got {value!r}")
    return code


def create_server() -> MCPServer:
    """A fresh currency server."""
    server = MCPServer("currency", instructions="Convert between currencies at ECB reference rates (Frankfurter).")

    @server.tool()
    async def convert(amount: float, from_currency: str, to_currency: str) -> Conversion:
        """Convert `amount` of `from_currency` into `to_currency` (3-letter codes, e.g. EUR, USD)."""
        source = _currency_code(from_currency, "from_currency")
        target = _currency_code(to_currency, "to_currency")
        if source == target:
            raise ToolError("from_currency and to_currency must differ")
        if not amount > 0:
            raise ToolError("amount must be positive")
        data = await get_json(
            "Frankfurter",
            f"{base_url(BASE_URL_ENV, DEFAULT_BASE_URL)}/latest",
            {"amount": amount, "from": source, "to": target},
            not_found=f"Frankfurter does not know {source} or {target}",
        )
        try:
            result = float(data["rates"][target])
            return Conversion(
                amount=amount,
                from_currency=source,
                to_currency=target,
                result=result,
                rate=result / amount,
                date=data["date"],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ToolError(f"Frankfurter answered without the expected field {exc}") from exc

    return server
