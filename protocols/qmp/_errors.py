"""The exceptions of the QMP client; every one of them is a :class:`QMPError`."""

from __future__ import annotations


class QMPError(Exception):
    """Base class of every error raised by :mod:`protocols.qmp`."""


class ExecuteError(QMPError):
    """QEMU answered a command with an error.

    Attributes:
        command: the command that failed, e.g. ``"device_del"``.
        error_class: QEMU's error class, e.g. ``"CommandNotFound"``, ``"GenericError"``,
            ``"DeviceNotActive"``.
        desc: QEMU's human-readable description.
    """

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class ConnectionLostError(QMPError):
    """The connection to QEMU is gone: QEMU closed it, the socket failed, QEMU sent
    something the client could not accept, or the client itself was closed.

    Raised by every call pending at that moment, by every later call, and by event
    iterators once their buffered events are consumed. ``__cause__`` holds the root
    cause when there is one: a :class:`ProtocolError` or an :class:`OSError`. A pending
    command may or may not have been executed by QEMU.
    """


class ProtocolError(QMPError):
    """The server broke the QMP protocol: a malformed or over-long line, an unexpected
    message, or an error reply without an id (QEMU could not parse our input).

    The connection cannot be trusted after that and is dropped: :func:`connect` raises
    this error during the handshake; afterwards it is the ``__cause__`` of the
    :class:`ConnectionLostError` that pending calls and event iterators raise.
    """


class LocalProtocolError(QMPError):
    """The sans-IO core was asked to do something the protocol forbids in its current
    state, such as sending a command before capabilities negotiation. A bug in the
    caller of the core; :class:`~protocols.qmp.QMPClient` never triggers it.
    """


class QMPTimeoutError(QMPError, TimeoutError):
    """A command or the handshake ran past its deadline.

    A command that timed out may still be executed by QEMU; its late reply is discarded.

    Attributes:
        command: the command that timed out, or ``None`` for the handshake.
        timeout: the deadline that passed, in seconds.
    """

    def __init__(self, command: str | None, timeout: float) -> None:
        what = "QMP handshake" if command is None else command
        super().__init__(f"{what}: no reply within {timeout:g} s")
        self.command = command
        self.timeout = timeout
