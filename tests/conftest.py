"""Test-session setup: 8 fake CPU devices, so sharding code runs on a real mesh in CI, and
one persistent compilation cache for the session.

The cache is shared by the xdist workers and by the processes tests start (the CLI runs of
the resume, multi-process and adapter tests), so a program one of them compiled is not
compiled again by the next (an executable loaded from the cache is the program compiled,
so bit-for-bit comparisons are unaffected). Only compiles over a second are stored.
"""

import os
import tempfile
import uuid

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# xdist gives every worker of one run the same id; a plain run gets its own.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or os.environ.setdefault(
    "ZOJAX_TEST_RUN", uuid.uuid4().hex)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"zojax-test-xla-cache-{_RUN}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")


def pytest_collection_modifyitems(config, items):
  """Under xdist, `slow`-marked tests start first, so the short ones fill the end of the run
  instead of a long test starting last on one worker while the other idles (a stable sort:
  files keep their order within each class). A serial run keeps the collection order, so a
  module's fixtures are built once."""
  if os.environ.get("PYTEST_XDIST_WORKER"):
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
