"""Ganeti's ``kvm`` hypervisor driver backed by kvm-supervisor (README: Running under Ganeti).

Everything here runs inside Ganeti's own Python (``/usr/bin/python3``), which has none
of the project's dependencies: these modules import the standard library, Ganeti's
modules and each other, nothing else. `hypervisor` is the driver, `hook` plugs it into
Ganeti, `rpc` talks to the daemon, `convert` maps Ganeti's objects to the daemon's
messages, `settings` says where the node's files are.
"""
