"""The host as the daemon uses it: the state dir, the uid pool, chroots, CPU pinning
and node facts. Imports `supervisor.model` only."""
