"""mitmproxy entry point: `mitmdump -s mcpmeter_addon.py --mode reverse:...`.

Kept to one import: mitmproxy hot-reloads this file only, and a bad edit here would
leave the proxy running without the meter. The implementation lives in addon/.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from addon.gateway import Mcpmeter  # noqa: E402

addons = [Mcpmeter()]
