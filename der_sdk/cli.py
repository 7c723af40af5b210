"""The ``der`` command line. Its subcommands come from plugins through the ``der_commands``
hook: der-sdk's own (plugins, profiles, new-adapter, check-config, sim, certs) from the
built-in :mod:`der_sdk.commands`, the reference headend's (headend, tokens, demo) and
agent's (agent, launch) from their packages, and any installed plugin's.

User mistakes (bad config, unknown names, unreachable ports) exit 2 with one clear message
and no traceback. The helpers here (:func:`run_async`, :func:`wait_for_stop_signal`,
:func:`env_with`, :func:`serve_until_stopped`) are for command implementations.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any

from der_sdk import __version__
from der_sdk.errors import ConfigError, DerSdkError, PluginError

__all__ = [
    "EXIT_USAGE",
    "build_parser",
    "env_with",
    "main",
    "run_async",
    "serve_until_stopped",
    "wait_for_stop_signal",
]

EXIT_USAGE = 2


# ----------------------------------------------------------------------------- helpers


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on uvloop when it is installed, else on the stdlib loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.run(coro)
    return uvloop.run(coro)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def env_with(overrides: Mapping[str, str | None]) -> dict[str, str]:
    """The process environment with command-line flags layered on top."""
    env = dict(os.environ)
    env.update({k: v for k, v in overrides.items() if v is not None})
    return env


async def wait_for_stop_signal(duration_s: float | None = None) -> None:
    """Return on SIGINT/SIGTERM, or after ``duration_s`` seconds when given."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), timeout=duration_s)
    except TimeoutError:
        pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def serve_until_stopped(work: Awaitable[None]) -> None:
    """Await ``work`` until it ends or SIGINT/SIGTERM arrives, then cancel it."""
    task = asyncio.ensure_future(work)
    stop = asyncio.ensure_future(wait_for_stop_signal())
    done: set[asyncio.Future[None]] = set()
    try:
        done, _ = await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, stop):
            pending.cancel()
        await asyncio.gather(task, stop, return_exceptions=True)
    if task in done:
        task.result()


# ----------------------------------------------------------------------------- parser


def build_parser(skipped: list[PluginError] | None = None) -> argparse.ArgumentParser:
    """The ``der`` parser with a subcommand for every command of the installed plugins.

    :param skipped: when given, plugins that fail to load are added to it and left out
        (their commands are missing) instead of failing the whole parser.
    :raises PluginError: a plugin failed to load (``skipped`` not given), or two plugins
        provide one command name.
    """
    from der_sdk.plugins import load_plugins

    parser = argparse.ArgumentParser(
        prog="der",
        description="der-sdk: DER adapters as plugins, a reference headend and edge agent.",
    )
    parser.add_argument("--version", action="version", version=f"der-sdk {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="logging level (env LOG_LEVEL, default INFO)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    on_error = skipped.append if skipped is not None else None
    for command in load_plugins(on_error=on_error).commands:
        p = sub.add_parser(
            command.name,
            help=command.help,
            description=command.description or None,
            add_help=command.add_help,
        )
        p.set_defaults(func=command.run)
        command.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # A broken plugin leaves out its own commands only; the commands that load every
    # plugin (der plugins, der headend...) still name it when they run.
    skipped: list[PluginError] = []
    try:
        parser = build_parser(skipped)
    except DerSdkError as exc:
        print(f"der: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code not in (0, None) and skipped:
            for error in skipped:
                print(f"der: a plugin could not be loaded: {error}", file=sys.stderr)
        raise
    _setup_logging(ns.log_level)
    func: Callable[[argparse.Namespace], int] = ns.func
    try:
        code = func(ns)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except BrokenPipeError:
        # The reader went away (der plugins | head): stop as a Unix tool does, with no
        # traceback, and keep Python's exit-time flush from failing on it again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except ConfigError as exc:
        print(f"der {ns.command}: invalid configuration:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    except DerSdkError as exc:
        print(f"der {ns.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
