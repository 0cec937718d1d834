"""What the daemon is told and reports: specs, hypervisor parameters, config, states,
API types, errors and their validation. Pure data and rules: no I/O beyond reading
the files it is given, no imports from the other layers."""
