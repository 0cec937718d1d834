"""kvm-supervisor: an event-driven supervisor for KVM/QEMU virtual machines."""
