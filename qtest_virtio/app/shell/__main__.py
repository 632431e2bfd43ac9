"""``python3 -m qtest_virtio.app.shell``: the same as ``qtest-virtio shell``."""

import sys

from . import main

sys.exit(main())
