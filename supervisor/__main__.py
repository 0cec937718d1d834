"""``python -m supervisor``: the ``kvm-supervisor`` command."""

from supervisor.cli.main import main

raise SystemExit(main())
