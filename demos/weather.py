"""weather: current conditions from Open-Meteo (no API key needed)."""

from typing import TypedDict

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from demos.upstream import base_url, get_json

BASE_URL_ENV = "MCPMETER_DEMO_OPEN_METEO_URL"
DEFAULT_BASE_URL = "https://api.open-meteo.com"


class CurrentWeather(TypedDict):
    latitude: float
    longitude: float
    time: str
    temperature: float
    temperature_unit: str
    wind_speed: float
    wind_speed_unit: str


def create_server() -> MCPServer:
    """A fresh weather server."""
    server = MCPServer("weather", instructions="Current weather for a point on Earth (Open-Meteo).")

    @server.tool()
    async def current_weather(latitude: float, longitude: float) -> CurrentWeather:
        """Current temperature and wind speed at `latitude`, `longitude` (decimal degrees)."""
        if not -90 <= latitude <= 90:
            raise ToolError("latitude must be between -90 and 90")
        if not -180 <= longitude <= 180:
            raise ToolError("longitude must be between -180 and 180")
        data = await get_json(
            "Open-Meteo",
            f"{base_url(BASE_URL_ENV, DEFAULT_BASE_URL)}/v1/forecast",
            {"latitude": latitude, "longitude": longitude, "current": "temperature_2m,wind_speed_10m"},
        )
        try:
            current, units = data["current"], data["current_units"]
            return CurrentWeather(
                latitude=data["latitude"],
                longitude=data["longitude"],
                time=current["time"],
                temperature=current["temperature_2m"],
                temperature_unit=units["temperature_2m"],
                wind_speed=current["wind_speed_10m"],
                wind_speed_unit=units["wind_speed_10m"],
            )
        except (KeyError, TypeError) as exc:
            raise ToolError(f"Open-Meteo answered without the expected field {exc}") from exc

    return server
