"""The cluster as Ganeti sees it: kvm-supervisor is each node's kvm hypervisor."""

from __future__ import annotations

import re

from .vcluster import NODES, VirtualCluster

#: This host's kernel has no magic SysRq, which Ganeti's node check wants: an error of
#: the machine, not of the driver.
_HOST_ERRORS = re.compile(r"ENODESETUP:node:node\d:node setup error: The procfs filesystem")


def test_verify_reports_no_driver_error(vcluster: VirtualCluster) -> None:
    result = vcluster.run(["gnt-cluster", "verify", "--error-codes"], check=False)
    errors = [
        line
        for line in result.stdout.splitlines()
        if " - ERROR:" in line and not _HOST_ERRORS.search(line)
    ]
    assert errors == [], result.stdout
    assert "kvm-supervisor" not in result.stdout
    nodes = vcluster.gnt("gnt-node", "list", "--no-headers", "-o", "name,mtotal,mfree")
    assert sorted(line.split()[0] for line in nodes.splitlines()) == list(NODES)
