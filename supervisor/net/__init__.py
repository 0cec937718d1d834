"""Host networking for instances: taps, bridged and routed NICs over netlink, Open vSwitch
ports over OVSDB. Imports model, host and qemu only.

The engine uses `supervisor.net.nics` (see its docstring for the order of calls).
"""
