"""The gateway process's garbage collector, tuned once mitmproxy runs: the start-up heap frozen.

mitmproxy's flows are reference cycles (a request and its flow refer to each other), so every
finished flow waits for a collection, and with CPython's defaults a full collection came about
every second under load, walking the whole heap (mitmproxy's and the meter's modules, options
and caches: about 110,000 objects), some 80 ms each: a pause for every call in flight, and CPU the
calls pay for. `gc.freeze()` once running moves the start-up heap to the permanent generation,
which no collection walks (collected first, so no garbage is frozen with it); the thresholds stay
CPython's, so dead flows are freed as often as before. Measured in the production gateway at c=32
(./scripts/bench, a gc callback): full collections 16 ms instead of 70-90 ms, 0.12 ms of
collection per paid call instead of 0.22-0.36 ms. Full collections ten times rarer (threshold2
100) measured no better, and kept five times more finished flows waiting in memory.

Process-wide and once per process (this module outlives mitmproxy's reloads of mcpmeter_addon.py).
"""

from __future__ import annotations

import gc

_tuned = False


def tune() -> None:
    global _tuned
    if _tuned:
        return
    _tuned = True
    gc.collect()
    gc.freeze()
