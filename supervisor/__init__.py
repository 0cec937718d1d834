"""kvm-supervisor: an event-driven supervisor for KVM/QEMU virtual machines."""

__version__ = "0.1.0"
