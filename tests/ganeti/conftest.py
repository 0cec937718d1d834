"""The session's virtual Ganeti cluster (`vcluster.virtual_cluster`), for every test here."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from .vcluster import VirtualCluster, missing_requirements, virtual_cluster


@pytest.fixture(scope="session")
def vcluster() -> Iterator[VirtualCluster]:
    """The two-node cluster, master node1, both nodes vm-capable, the driver installed."""
    missing = missing_requirements()
    if missing is not None:
        pytest.fail(missing)
    with virtual_cluster() as cluster:
        print(f"\nvirtual Ganeti cluster up in {cluster.setup_seconds:.1f} s", file=sys.stderr)
        yield cluster
