"""The ``kvm-supervisor`` command: ``serve``, ``cmdline`` and the control-socket client verbs.

Exit status (API.md §5): 0 success, 1 error reported by the daemon, 2 usage error,
3 daemon unreachable. Logs go to stderr; stdout carries only the command's output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec

from protocols.jsonrpc import RPCClient, RPCError, connect_unix
from supervisor import __version__
from supervisor.cli.ganeti_setup import GANETI_LIB, GANETI_PYTHON
from supervisor.cli.remote import (
    SshTarget,
    bridge_stdio,
    connect_ssh,
    parse_connect,
    run_remote_terminal,
)
from supervisor.cli.render import print_json, print_mapping, print_table, show_wait
from supervisor.model.config import Config, load_config
from supervisor.model.errors import SupervisorError

EXIT_OK = 0
EXIT_DAEMON_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

#: Verbs that work on this host's files, never through --connect.
_LOCAL_VERBS = frozenset({"serve", "cmdline", "rpc-stdio", "ganeti-install", "ganeti-uninstall"})


class UsageError(Exception):
    """A mistake in the command line or in a file it names (exit status 2)."""


class DaemonUnreachable(Exception):
    """No daemon answers on the control socket (exit status 3); says what to do."""

    def __init__(self, path: str, error: OSError) -> None:
        if isinstance(error, FileNotFoundError):
            what = f"no control socket at {path}"
        elif isinstance(error, ConnectionRefusedError):
            what = f"nothing listens on {path} (connection refused)"
        elif isinstance(error, PermissionError):
            what = (
                f"{path}: permission denied: run as root, or as a member of the daemon's"
                " control_group"
            )
        else:
            what = f"the connection to {path} failed: {error.strerror or error}"
        hint = (
            "start the daemon with `kvm-supervisor serve --config FILE` (or `make run`), or"
            " point at its socket with --socket PATH or --config FILE"
        )
        super().__init__(
            f"daemon unreachable: {what}"
            + ("" if isinstance(error, PermissionError) else f"; {hint}")
        )


@asynccontextmanager
async def _connect(args: argparse.Namespace) -> AsyncIterator[RPCClient]:
    """A client of the daemon's control socket, or of a remote one (``--connect``);
    `DaemonUnreachable` when none answers."""
    async with _connect_to(args.connect or str(_socket_path(args)), "--connect") as client:
        yield client


@asynccontextmanager
async def _connect_to(where: str, option: str) -> AsyncIterator[RPCClient]:
    """A client of the daemon `where` names: an ``ssh://`` URL or a control socket path."""
    if "://" in where:
        async with _connect_remote(where, option) as client:
            yield client
        return
    async with _connect_local(Path(where)) as client:
        yield client


@asynccontextmanager
async def _connect_remote(url: str, option: str) -> AsyncIterator[RPCClient]:
    try:
        async with connect_ssh(_remote_target(url, option)) as client:
            yield client
    except ConnectionError as error:
        raise DaemonUnreachable(url, error) from None


@asynccontextmanager
async def _connect_local(path: Path) -> AsyncIterator[RPCClient]:
    try:
        async with connect_unix(path) as client:
            yield client
    except (ConnectionError, FileNotFoundError, PermissionError) as error:
        raise DaemonUnreachable(str(path), error) from None


def _remote_target(url: str, option: str) -> SshTarget:
    try:
        return parse_connect(url)
    except ValueError as error:
        raise UsageError(f"{option}: {error}") from None


async def _rpc_stdio(args: argparse.Namespace) -> int:
    """Bridge stdin/stdout to the local control socket (the remote end of --connect)."""
    path = _socket_path(args)
    try:
        stream = await anyio.connect_unix(path)
    except (ConnectionError, FileNotFoundError, PermissionError) as error:
        raise DaemonUnreachable(str(path), error) from None
    async with stream:
        await bridge_stdio(stream)
    return EXIT_OK


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    # Accepted before and after the verb: the sub-parser copies must not reset the
    # values given before the verb, hence SUPPRESS defaults there.
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--config", metavar="PATH", default=default, help="daemon config file")
    parser.add_argument("--socket", metavar="PATH", default=default, help="control socket")
    parser.add_argument(
        "--connect",
        metavar="URL",
        default=default,
        help="a daemon on another host: ssh://[user@]host[:port][/socket]",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="machine-readable output",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvm-supervisor", description="Start, watch and control KVM/QEMU virtual machines."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _global_options(parser, suppress=False)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help_text, description=help_text)
        _global_options(sub, suppress=True)
        return sub

    verb("serve", "run the daemon in the foreground")
    sub = verb("cmdline", "print the QEMU argv `start` would run (needs no daemon)")
    sub.add_argument("--spec", required=True, metavar="FILE", help="instance TOML file")
    verb("rpc-stdio", "bridge stdin/stdout to the control socket (what --connect runs)")
    verb("ping", "check that the daemon answers")
    verb("info", "daemon, QEMU and node information")
    verb("verify", "check the node: binaries, /dev/kvm, /dev/net/tun, state dir")
    verb("list", "list instances")
    sub = verb("show", "show one instance")
    sub.add_argument("name")
    sub = verb("start", "start a defined instance or a spec file")
    sub.add_argument("name", nargs="?")
    sub.add_argument("--spec", metavar="FILE", help="instance TOML or JSON file")
    sub.add_argument("--paused", action="store_true", help="leave the guest paused")
    sub = verb("stop", "stop an instance (ACPI power button, then kill)")
    sub.add_argument("name")
    sub.add_argument("--force", action="store_true", help="kill at once")
    sub.add_argument("--timeout", type=float, metavar="S", help="ACPI wait before the kill")
    for name, help_text in (
        ("reboot", "stop, then start from the saved runtime (same uuid)"),
        ("pause", "pause the guest's vCPUs"),
        ("resume", "resume the guest's vCPUs"),
        ("cleanup", "remove runtime files, taps, uid lease and chroot"),
        ("console", "attach to the serial console (Ctrl-] detaches)"),
    ):
        verb(name, help_text).add_argument("name")
    sub = verb("balloon", "set the guest's balloon target")
    sub.add_argument("name")
    sub.add_argument("memory_mib", type=int, metavar="MIB")
    sub = verb("monitor", "run a human-monitor command")
    sub.add_argument("name")
    sub.add_argument("command", nargs="+")
    sub = verb("qmp", "run a raw QMP command")
    sub.add_argument("name")
    sub.add_argument("command")
    sub.add_argument("arguments", nargs="?", metavar="JSON")
    sub = verb("migrate", "migrate a running instance to another daemon")
    sub.add_argument("name")
    sub.add_argument(
        "--to",
        required=True,
        metavar="TARGET",
        help="the target daemon: its control socket, or ssh://[user@]host[:port][/socket]",
    )
    mode = sub.add_mutually_exclusive_group()
    mode.add_argument("--live", dest="live", action="store_true", help="the guest keeps running")
    mode.add_argument("--non-live", dest="live", action="store_false", help="pause it first")
    sub.set_defaults(live=None)
    sub.add_argument("--bandwidth", type=int, metavar="MIB_S", help="bandwidth limit, MiB/s")
    sub.add_argument("--downtime", type=int, metavar="MS", help="longest downtime, ms")
    sub.add_argument(
        "--address",
        metavar="IP",
        help="where the target listens and the source connects (default 127.0.0.1 for a"
        " socket path; needed with ssh://)",
    )
    sub.add_argument("--port", type=int, default=0, metavar="P", help="target port (0: any)")
    sub = verb("ganeti-install", "make this Ganeti node's kvm hypervisor kvm-supervisor's driver")
    sub.add_argument("--ganeti-python", default=GANETI_PYTHON, metavar="PATH")
    sub.add_argument("--ganeti-lib", default=GANETI_LIB, metavar="DIR")
    verb("ganeti-uninstall", "give this Ganeti node its own kvm hypervisor back")
    sub = verb("events", "stream events, one line each")
    sub.add_argument("--instance", action="append", metavar="NAME")
    sub.add_argument("--kind", action="append", metavar="K")
    return parser


def _socket_path(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    return _config(args).control_socket


def _config(args: argparse.Namespace) -> Config:
    try:
        return load_config(args.config)
    except SupervisorError as error:
        raise UsageError(str(error)) from None
    except OSError as error:
        raise UsageError(f"{args.config}: {error.strerror}") from None


def _read_spec_file(path: str) -> Any:
    from supervisor.model.config import load_instance_file

    try:
        if path.endswith(".json"):
            return msgspec.json.decode(Path(path).read_bytes())
        return msgspec.to_builtins(load_instance_file(path))
    except (OSError, msgspec.DecodeError) as error:
        raise UsageError(f"{path}: {error}") from None
    except SupervisorError as error:
        raise UsageError(f"{path}: {error}") from None


def _render(args: argparse.Namespace, result: Any) -> None:
    if args.json:
        print_json(result)
    elif args.verb == "list":
        print_table(result, ("name", "state", "pid"))
    elif args.verb == "monitor":
        sys.stdout.write(result["output"])
        if result["output"] and not result["output"].endswith("\n"):
            sys.stdout.write("\n")
    elif args.verb == "qmp":
        print(json.dumps(result["return"], indent=2))
    elif isinstance(result, dict):
        if result:
            print_mapping(result)
    else:
        print(result)


def _request(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    verb = args.verb
    if verb in {"ping", "info", "verify"}:
        return f"supervisor.{verb}", {}
    if verb == "list":
        return "instance.list", {}
    if verb == "show":
        return "instance.info", {"name": args.name}
    if verb == "start":
        if (args.name is None) == (args.spec is None):
            raise UsageError("start needs exactly one of NAME or --spec FILE")
        params: dict[str, Any] = {"paused": args.paused}
        if args.spec:
            params["spec"] = _read_spec_file(args.spec)
        else:
            params["name"] = args.name
        return "instance.start", params
    if verb == "stop":
        params = {"name": args.name, "force": args.force}
        if args.timeout is not None:
            params["timeout_s"] = args.timeout
        return "instance.stop", params
    if verb in {"reboot", "pause", "resume", "cleanup"}:
        return f"instance.{verb}", {"name": args.name}
    if verb == "balloon":
        return "instance.balloon", {"name": args.name, "memory_mib": args.memory_mib}
    if verb == "monitor":
        return "instance.monitor", {"name": args.name, "command": " ".join(args.command)}
    if verb == "qmp":
        params = {"name": args.name, "command": args.command}
        if args.arguments:
            try:
                params["arguments"] = json.loads(args.arguments)
            except json.JSONDecodeError as error:
                raise UsageError(f"arguments: not JSON: {error}") from None
        return "instance.qmp", params
    raise UsageError(f"unknown verb {verb}")


async def _call(args: argparse.Namespace) -> int:
    method, params = _request(args)
    async with _connect(args) as client, anyio.create_task_group() as tg:
        if args.verb in {"stop", "reboot"} and not params.get("force") and sys.stderr.isatty():
            tg.start_soon(
                show_wait,
                f"{args.name}: waiting for the guest to power off (ACPI power button)",
                params.get("timeout_s", _stop_timeout(args)),
                sys.stderr,
            )
        result = await client.call(method, params)
        tg.cancel_scope.cancel()
    _render(args, result)
    return EXIT_OK


def _stop_timeout(args: argparse.Namespace) -> float | None:
    """The daemon's ``stop_timeout_s``, if its config file can be read here."""
    try:
        return _config(args).stop_timeout_s
    except UsageError:
        return None


async def _events(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {}
    if args.instance:
        params["instances"] = args.instance
    if args.kind:
        params["kinds"] = args.kind
    async with _connect(args) as client:
        await client.call("events.subscribe", params)
        async for notification in client.notifications():
            event = notification.params if isinstance(notification.params, dict) else {}
            if args.json:
                print_json(event)
            else:
                data = json.dumps(event.get("data", {}), separators=(",", ":"))
                print(
                    f"{event.get('timestamp', 0):.3f} {event.get('instance', '-')} "
                    f"{event.get('kind')} {data}"
                )
            sys.stdout.flush()
    return EXIT_OK


async def _console(args: argparse.Namespace) -> int:
    from supervisor.cli.console import attach

    async with _connect(args) as client:
        console = await client.call("instance.console", {"name": args.name})
    if console.get("kind") != "serial":
        print(json.dumps(console), file=sys.stderr)
        return EXIT_DAEMON_ERROR
    try:
        await attach(Path(console["socket"]))
    except OSError as error:
        print(f"kvm-supervisor: console {console['socket']}: {error.strerror}", file=sys.stderr)
        return EXIT_DAEMON_ERROR
    return EXIT_OK


async def _ganeti_install(args: argparse.Namespace) -> int:
    from supervisor.cli import ganeti_setup
    from supervisor.ganeti.settings import node_root

    try:
        done = await ganeti_setup.install(
            _socket_path(args),
            root=node_root(),
            ganeti_python=args.ganeti_python,
            ganeti_lib=args.ganeti_lib,
        )
    except ganeti_setup.GanetiSetupError as error:
        raise UsageError(str(error)) from None
    print("\n".join(done))
    return EXIT_OK


async def _ganeti_uninstall(args: argparse.Namespace) -> int:
    from supervisor.cli import ganeti_setup
    from supervisor.ganeti.settings import node_root

    try:
        done = ganeti_setup.uninstall(root=node_root())
    except ganeti_setup.GanetiSetupError as error:
        raise UsageError(str(error)) from None
    print("\n".join(done))
    return EXIT_OK


def _configure_logging() -> None:
    # Only the verbs that log load structlog: the client verbs start faster without it.
    from supervisor.cli.logs import configure_logging

    configure_logging(level=os.environ.get("KVM_SUPERVISOR_LOG_LEVEL", "info"))


async def _cmdline(args: argparse.Namespace) -> int:
    from supervisor.qemu.cmdline import argv_for_spec_file

    _configure_logging()
    argv = await argv_for_spec_file(Path(args.spec), _config(args))
    if args.json:
        print_json(argv)
    else:
        sys.stdout.write("".join(f"{arg}\n" for arg in argv))
    return EXIT_OK


async def _serve(args: argparse.Namespace) -> int:
    from supervisor.cli.serve import serve
    from supervisor.control.server import ControlSocketError
    from supervisor.host.statedir import StateDirLocked

    _configure_logging()
    try:
        await serve(_config(args))
    except (StateDirLocked, ControlSocketError) as error:
        print(f"kvm-supervisor: {error}", file=sys.stderr)
        return EXIT_DAEMON_ERROR
    except OSError as error:
        # The state dir cannot be set up (read-only, a file where the control socket
        # goes): the daemon's failures while it runs are logged where they happen.
        print(f"kvm-supervisor: cannot start: {error}", file=sys.stderr)
        return EXIT_DAEMON_ERROR
    return EXIT_OK


async def _migrate(args: argparse.Namespace) -> int:
    from supervisor.cli.migrate import run_migrate

    if "://" in args.to and args.address is None:
        raise UsageError("--address: give the address the source reaches the target at")
    async with _connect(args) as source, _connect_to(args.to, "--to") as target:
        return await run_migrate(args, source, target)


def _runner(args: argparse.Namespace) -> Callable[[], Any]:
    if args.connect and args.verb in _LOCAL_VERBS:
        raise UsageError(f"{args.verb} runs on this host only: no --connect")
    handlers = {
        "serve": _serve,
        "cmdline": _cmdline,
        "events": _events,
        "console": _console,
        "migrate": _migrate,
        "rpc-stdio": _rpc_stdio,
        "ganeti-install": _ganeti_install,
        "ganeti-uninstall": _ganeti_uninstall,
    }
    handler = handlers.get(args.verb, _call)
    return lambda: handler(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.connect and args.verb == "console":
            target = _remote_target(args.connect, "--connect")
            return run_remote_terminal(target, ["console", args.name])
        return int(anyio.run(_runner(args)))
    except UsageError as error:
        print(f"kvm-supervisor: {error}", file=sys.stderr)
        return EXIT_USAGE
    except RPCError as error:
        detail = f" {json.dumps(error.data)}" if error.data else ""
        print(f"kvm-supervisor: {error.message}{detail}", file=sys.stderr)
        return EXIT_DAEMON_ERROR
    except SupervisorError as error:
        print(f"kvm-supervisor: {error}", file=sys.stderr)
        return EXIT_USAGE if args.verb == "cmdline" else EXIT_DAEMON_ERROR
    except DaemonUnreachable as error:
        print(f"kvm-supervisor: {error}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return 130
