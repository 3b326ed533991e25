"""Worker crashes with the saga store on a 3-master Redis Cluster: the scenarios of test_workers and test_isolation.

The scenarios are imported, so pytest runs them here with this module's
``env``: the same broker, the saga store on the cluster.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.deployments import Cluster
from tests.processes.test_isolation import (  # noqa: F401 - collected here, with this module's env
    test_sagas_on_one_order_never_overlap_through_failures_and_killed_workers,
)
from tests.processes.test_workers import (  # noqa: F401 - collected here, with this module's env
    test_pool_child_killed_mid_step_compensates,
    test_worker_killed_between_record_and_publish,
)
from tests.subprocs import proc_env


@pytest.fixture
def sagas() -> int:
    """The held isolation scenario with half its sagas: every lock start and end is a call more on a cluster."""
    return 500


@pytest.fixture
def env(redis_url: str, ns: str, cluster: Cluster, request: pytest.FixtureRequest) -> SimpleNamespace:
    """The test's Redis (broker), prefix and queue, with its saga store on the cluster (and its ``saga_conf``)."""
    mark = request.node.get_closest_marker("saga_conf")
    conf = {**(mark.args[0] if mark else {}), **cluster.saga_conf}
    return proc_env(redis_url, f"sagaproc-{ns}", f"q-{ns}", conf)
