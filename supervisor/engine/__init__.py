"""Supervision: the `Supervisor` (every instance of a state dir), one `Instance` per VM
with its task, the launcher, the event bus and the restart policy. Imports the
layers below (model, host, qemu) and the protocol clients, never the control surface."""
