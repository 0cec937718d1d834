"""``make bench``: run every ``tests/bench/bench_*.py`` in turn and report how each ended.

Run: ``.venv/bin/python tests/bench/run.py [NAME ...]`` (names select scripts, e.g.
``qmp`` or ``bench_supervisor.py``; default: all). Each script runs as a subprocess
with this interpreter, one after the other (they measure: never two at once), and its
output streams through as it comes. The figures are figures, not assertions: a ratio
that misses its target does not fail the run. The exit status is 0 when every script
finished normally, 1 when one crashed (non-zero exit), 130 when interrupted.

``bench_libvirt.py`` runs with ``--json``: its table streams on stderr and its anchors
are kept in a temp file whose path the later scripts find in ``KVS_BENCH_LIBVIRT_JSON``
(``bench_supervisor.py`` then compares against them instead of measuring libvirt again).

Ctrl-C reaches the running script too (same process group): it cleans up after itself
and this runner waits for it, then stops.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parents[1]
#: Known scripts in the order they run; others follow, by name.
ORDER = (
    "bench_qmp.py",
    "bench_hmp.py",
    "bench_libvirt.py",
    "bench_supervisor.py",
    "bench_net.py",
    "bench_migration.py",
    "bench_ganeti.py",
)
LIBVIRT = "bench_libvirt.py"
LIBVIRT_ENV = "KVS_BENCH_LIBVIRT_JSON"
#: How long an interrupted script gets to clean up before it is killed.
INTERRUPT_GRACE_S = 120.0


def discover(selected: list[str]) -> list[Path]:
    """The bench scripts that exist, in running order, filtered by `selected`."""
    scripts = sorted(
        BENCH_DIR.glob("bench_*.py"),
        key=lambda p: (ORDER.index(p.name) if p.name in ORDER else len(ORDER), p.name),
    )
    if not selected:
        return scripts
    wanted = {name.removeprefix("bench_").removesuffix(".py") for name in selected}
    unknown = wanted - {p.stem.removeprefix("bench_") for p in scripts}
    if unknown:
        raise SystemExit(f"run.py: no such bench script: {', '.join(sorted(unknown))}")
    return [p for p in scripts if p.stem.removeprefix("bench_") in wanted]


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def run_script(script: Path, env: dict[str, str], anchors: Path) -> int:
    """Run one script, streaming its output; its exit status."""
    command = [sys.executable, str(script)]
    stdout = None
    if script.name == LIBVIRT:
        command.append("--json")  # table on stderr, anchors as JSON on stdout
        stdout = anchors.open("wb")
    try:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=stdout)
    finally:
        if stdout is not None:
            stdout.close()
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # The script got the SIGINT too: let it clean up (further ^C are ignored here).
        deadline = time.monotonic() + INTERRUPT_GRACE_S
        while True:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                break
            except KeyboardInterrupt:
                continue
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                break
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("names", nargs="*", metavar="NAME", help="scripts to run (default: all)")
    args = parser.parse_args(argv)
    scripts = discover(args.names)
    if not scripts:
        print("run.py: no bench scripts found", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="kvs-run-", dir="/tmp"))
    anchors = tmp / "libvirt.json"
    env = dict(os.environ)
    env.pop(LIBVIRT_ENV, None)
    results: list[tuple[str, int | None, float]] = []
    interrupted = False
    try:
        for script in scripts:
            banner(f"{script.name} ({time.strftime('%H:%M:%S')})")
            started = time.monotonic()
            try:
                status = run_script(script, env, anchors)
            except KeyboardInterrupt:
                results.append((script.name, None, time.monotonic() - started))
                interrupted = True
                break
            results.append((script.name, status, time.monotonic() - started))
            if script.name == LIBVIRT and status == 0 and anchors.stat().st_size > 0:
                env[LIBVIRT_ENV] = str(anchors)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    banner("summary")
    for name, code, seconds in results:
        outcome = {None: "interrupted", 0: "ok"}.get(code, f"CRASHED (exit status {code})")
        print(f"  {name:<24} {outcome:<28} {seconds:6.1f} s")
    if interrupted:
        return 130
    print("  (figures, not assertions: a missed target does not fail the run)")
    return 1 if any(code != 0 for _, code, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
