"""The gateway process's garbage collector, tuned once mitmproxy runs.

Every call allocates thousands of objects (mitmproxy's flow, its headers and connections, the
meter's call), nearly all freed by reference counting. With CPython's defaults (700, 10, 10) the
collector also ran a full collection every second or so under load, walking the whole heap
(mitmproxy's and the meter's modules, options and caches: about 110,000 objects), some 80 ms
each: a pause for every call in flight, and CPU the calls pay for. Measured in the production
gateway at c=32 (./scripts/bench, a gc callback, two rounds each): 0.22-0.36 ms of collection
per paid call with the defaults, 0.10-0.14 ms with these settings, and no full collection in a
6 s run:

- `gc.freeze()` once running: the start-up heap goes to the permanent generation, which no
  collection walks (collected first, so no garbage is frozen with it);
- a full collection every THRESHOLD2 middle ones instead of 10. Young collections stay as they
  are (short pauses; a young threshold of 10,000 measured the same total with 6 ms pauses).

Process-wide and once per process (this module outlives mitmproxy's reloads of mcpmeter_addon.py).
"""

from __future__ import annotations

import gc

THRESHOLD2 = 100

_tuned = False


def tune() -> None:
    global _tuned
    if _tuned:
        return
    _tuned = True
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, THRESHOLD2)
