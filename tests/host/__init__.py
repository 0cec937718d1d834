"""Tests of the host primitives: processes, state dir, uid pool, chroot, pinning, node."""
