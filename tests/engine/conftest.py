"""The real-guest fixtures of tests/core (a private state dir, cleaned up by pid)."""

from core.conftest import state_dir

__all__ = ["state_dir"]
