"""The ``kvm-supervisor`` program: its verbs, ``serve`` (the daemon), the console,
sd_notify and log set-up. The top layer: nothing imports it."""
