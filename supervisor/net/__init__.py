"""Host networking for instances: taps, bridged and routed NICs over netlink.

The engine uses `supervisor.net.nics` (see its docstring for the order of calls).
"""
