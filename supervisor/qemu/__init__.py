"""QEMU itself: accelerator and capability probing, the command-line builder, the
runtime record of a start and the process (spawn, pidfd, adoption). Imports
`supervisor.model` and `supervisor.host`."""
