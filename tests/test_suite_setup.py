"""The test run's own machinery: xdist groups reach the scheduler."""

import pytest

pytestmark = pytest.mark.xdist_group("suite_setup")


def test_xdist_group_marks_reach_the_scheduler(request):
  """`make test` runs with --dist loadgroup so that a module's expensive module fixture is
  built on one worker; xdist does that by suffixing the node id with the group. A pytest that
  drops the suffix (9.2 with xdist 3.8) would run every module fixture once per worker,
  silently."""
  if not request.config.getvalue("loadgroup"):
    pytest.skip("not run under --dist loadgroup")
  assert request.node.nodeid.endswith("@suite_setup"), request.node.nodeid
