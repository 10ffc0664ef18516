"""mcpmeter's benchmark: the gateway against bare mitmproxy, on one machine (`python -m bench.run`)."""
