"""Host networking for instances (taps, bridges, routes, Open vSwitch).

Imports model, host, qemu only.
"""
