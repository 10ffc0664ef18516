"""Offline stand-ins for the public APIs behind the demo servers.

Serves canned but plausible answers on the exact paths the demos call:

- Open-Meteo  `GET /v1/forecast`
- Frankfurter `GET /latest` (rates in `EUR_RATES`; 404 for other currencies)
- Wikipedia   `GET /w/rest.php/v1/search/page`
- GitHub      `GET /repos/{owner}/{name}` (the repos in `REPOS`; 404 otherwise, e.g. owner `nope`)

Run `python -m demos.fake_apis --port 3012`, then start the demos with every
`MCPMETER_DEMO_*_URL` set to `http://127.0.0.1:3012`.
"""

import argparse
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

RATE_DATE = "2025-01-31"
EUR_RATES = {"EUR": 1.0, "USD": 1.0393, "GBP": 0.8386, "JPY": 160.49, "CHF": 0.9449, "CAD": 1.5064}
"""Units of each currency per euro, as the ECB published them on `RATE_DATE`."""

REPOS: dict[str, dict[str, Any]] = {
    "modelcontextprotocol/python-sdk": {
        "description": "The official Python SDK for Model Context Protocol servers and clients",
        "stargazers_count": 19234,
        "forks_count": 2710,
        "language": "Python",
        "license": {"key": "mit", "name": "MIT License", "spdx_id": "MIT"},
    },
    "mitmproxy/mitmproxy": {
        "description": "An interactive TLS-capable intercepting HTTP proxy for penetration testers and developers.",
        "stargazers_count": 38912,
        "forks_count": 4201,
        "language": "Python",
        "license": {"key": "mit", "name": "MIT License", "spdx_id": "MIT"},
    },
    "octocat/hello-world": {
        "description": "My first repository on GitHub!",
        "stargazers_count": 2950,
        "forks_count": 2912,
        "language": None,
        "license": None,
    },
}

ARTICLES = [
    ("Python_(programming_language)", "Python (programming language)", "General-purpose programming language"),
    ("Monty_Python", "Monty Python", "British comedy troupe"),
    ("Pythonidae", "Pythonidae", "Family of snakes"),
    ("Model_Context_Protocol", "Model Context Protocol", "Open protocol connecting AI models to tools and data"),
    ("Open-Meteo", "Open-Meteo", "Open-source weather API"),
    ("Euro", "Euro", "Official currency of the eurozone"),
    ("Berlin", "Berlin", "Capital and largest city of Germany"),
]


def _bad_request(reason: str) -> JSONResponse:
    return JSONResponse({"error": True, "reason": reason}, status_code=400)


async def forecast(request: Request) -> JSONResponse:
    """Open-Meteo's current-weather answer, with fixed readings."""
    try:
        latitude = float(request.query_params["latitude"])
        longitude = float(request.query_params["longitude"])
    except (KeyError, ValueError):
        return _bad_request("Parameters 'latitude' and 'longitude' must be numbers")
    if not (-90 <= latitude <= 90 and -180 <= longitude <= 180):
        return _bad_request("Latitude must be in range of -90 to 90°. Longitude must be in range of -180 to 180°.")
    return JSONResponse(
        {
            "latitude": round(latitude, 2),
            "longitude": round(longitude, 2),
            "generationtime_ms": 0.03,
            "utc_offset_seconds": 0,
            "timezone": "GMT",
            "timezone_abbreviation": "GMT",
            "elevation": 38.0,
            "current_units": {
                "time": "iso8601",
                "interval": "seconds",
                "temperature_2m": "°C",
                "wind_speed_10m": "km/h",
            },
            "current": {"time": "2025-01-31T12:00", "interval": 900, "temperature_2m": 4.2, "wind_speed_10m": 11.5},
        }
    )


async def latest(request: Request) -> JSONResponse:
    """Frankfurter's latest-rates answer, converted through `EUR_RATES`."""
    source = request.query_params.get("from", "EUR")
    targets = request.query_params.get("to", ",".join(EUR_RATES)).split(",")
    if source not in EUR_RATES or any(target not in EUR_RATES for target in targets):
        return JSONResponse({"message": "not found"}, status_code=404)
    try:
        amount = float(request.query_params.get("amount", "1"))
    except ValueError:
        return JSONResponse({"message": "invalid amount"}, status_code=422)
    rates = {t: round(amount * EUR_RATES[t] / EUR_RATES[source], 5) for t in targets if t != source}
    return JSONResponse({"amount": amount, "base": source, "date": RATE_DATE, "rates": rates})


async def search_page(request: Request) -> JSONResponse:
    """Wikipedia's page-search answer over the articles in `ARTICLES` whose title shares a word with `q`."""
    query = request.query_params.get("q", "").strip()
    if not query:
        return JSONResponse({"httpCode": 400, "httpReason": "Bad Request", "messageTranslations": {}}, status_code=400)
    words = query.lower().split()
    limit = int(request.query_params.get("limit", "10"))
    matches = [article for article in ARTICLES if any(word in article[1].lower() for word in words)]
    pages = [
        {
            "id": 1000 + index,
            "key": key,
            "title": title,
            "excerpt": f'<span class="searchmatch">{title}</span> &ndash; {description.lower()}.',
            "matched_title": None,
            "description": description,
            "thumbnail": None,
        }
        for index, (key, title, description) in enumerate(matches[:limit])
    ]
    return JSONResponse({"pages": pages})


async def repository(request: Request) -> JSONResponse:
    """GitHub's repository answer for the repos in `REPOS`, its 404 for any other."""
    full_name = f"{request.path_params['owner']}/{request.path_params['name']}"
    canned = next((value for key, value in REPOS.items() if key.lower() == full_name.lower()), None)
    if canned is None:
        return JSONResponse(
            {"message": "Not Found", "documentation_url": "https://docs.github.com/rest/repos/repos#get-a-repository"},
            status_code=404,
        )
    return JSONResponse({"full_name": full_name, "name": request.path_params["name"], "private": False, **canned})


def build_app() -> Starlette:
    """The fake-APIs app."""
    return Starlette(
        routes=[
            Route("/v1/forecast", forecast),
            Route("/latest", latest),
            Route("/w/rest.php/v1/search/page", search_page),
            Route("/repos/{owner}/{name}", repository),
        ]
    )


def main() -> None:
    """Parse the command line and serve until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m demos.fake_apis", description="Serve offline fakes of the demo APIs."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3012)
    args = parser.parse_args()
    uvicorn.run(build_app(), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
