"""mitmproxy entry point: `mitmdump -s mcpmeter_addon.py --mode reverse:...`.

Kept to two imports: mitmproxy hot-reloads this file only, and a bad edit here drops the
meter. The fail-closed guard, added to the master on the first load and kept across
reloads, then refuses every request until a working meter is back (addon/guard.py).
The implementation lives in addon/.
"""

import os
import sys

from mitmproxy import ctx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from addon import guard  # noqa: E402

guard.install(getattr(ctx, "master", None))

from addon.gateway import Mcpmeter  # noqa: E402

addons = [Mcpmeter()]
