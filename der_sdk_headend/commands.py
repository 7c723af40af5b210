"""The headend's ``der`` commands (``headend``, ``tokens``, ``demo``), registered through the
``der_commands`` hook from the ``der_sdk`` entry point group. The headend itself is
imported only when one of them runs, so ``der --help`` stays quick.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from der_sdk.cli import env_with, run_async
from der_sdk.errors import DerSdkError
from der_sdk.extensions import CommandType
from der_sdk.plugins import hookimpl
from der_sdk_headend.cli_tokens import add_tokens_arguments, cmd_tokens

__all__ = ["der_commands"]


def cmd_headend(ns: argparse.Namespace) -> int:
    from der_sdk_headend.config import HeadendConfig
    from der_sdk_headend.service import run_headend

    env = env_with(
        {
            "ASSETS_PATH": ns.assets,
            "DATABASE_URL": ns.database_url,
            "HEADEND_GRPC_ADDR": ns.grpc_addr,
            "HEADEND_HTTP_ADDR": ns.http_addr,
            "RESET_DB": "1" if ns.reset_db else None,
            "HEADEND_INSECURE": "1" if ns.insecure else None,
        }
    )
    run_async(run_headend(HeadendConfig.from_env(env)))
    return 0


def _add_headend_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--assets", help="inventory YAML (env ASSETS_PATH)")
    p.add_argument(
        "--database-url", help="storage URL (env DATABASE_URL, default sqlite:///der-data/der.db)"
    )
    p.add_argument(
        "--grpc-addr",
        help="agent gRPC bind host:port (env HEADEND_GRPC_ADDR, default 127.0.0.1:50051)",
    )
    p.add_argument(
        "--http-addr", help="REST bind host:port (env HEADEND_HTTP_ADDR, default 127.0.0.1:3001)"
    )
    p.add_argument("--reset-db", action="store_true", help="clear stored data at start (RESET_DB)")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow serving plaintext (no TLS) on a non-loopback address (HEADEND_INSECURE)",
    )


def cmd_demo(ns: argparse.Namespace) -> int:
    from der_sdk_headend.demo import resolve_example, run_demo

    resolve_example(ns)
    for option, what, path in (
        ("--assets", "inventory", ns.assets),
        ("--config", "agent config", ns.config),
    ):
        if path is not None and not Path(path).is_file():
            raise DerSdkError(f"{option} {path}: demo {what} not found")
    run_async(run_demo(ns))
    return 0


def _add_demo_arguments(p: argparse.ArgumentParser) -> None:
    from der_sdk_headend.demo import DEFAULT_EXAMPLE, EXAMPLES

    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--example",
        choices=sorted(EXAMPLES),
        default=None,
        help="which example fleet to run: "
        + "; ".join(f"{name}: {example.about}" for name, example in sorted(EXAMPLES.items()))
        + f" (default {DEFAULT_EXAMPLE})",
    )
    which.add_argument(
        "--assets",
        default=None,
        help="run this inventory YAML instead of an example (its agents use --config, "
        "else sim-bess for every asset)",
    )
    p.add_argument("--data-dir", default="der-data", help="where the SQLite file lives")
    p.add_argument("--http-addr", default=None, help="REST bind (default 127.0.0.1:3001)")
    p.add_argument("--grpc-addr", default=None, help="gRPC bind (default 127.0.0.1:50051)")
    p.add_argument(
        "--config", help="agent config YAML for the demo agents (default: the example's)"
    )
    p.add_argument("--reset-db", action="store_true", help="start from empty storage")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument(
        "--tls",
        action="store_true",
        help="run with mutual TLS for the agents, REST over HTTPS and an operator token "
        "(development certificates under DATA_DIR/demo-tls)",
    )


@hookimpl
def der_commands() -> list[CommandType]:
    return [
        CommandType(
            name="headend",
            help="run the reference headend (REST + agent gRPC)",
            description="Run the headend. Flags override the environment.",
            add_arguments=_add_headend_arguments,
            run=cmd_headend,
        ),
        CommandType(
            name="tokens",
            help="create, list and revoke REST bearer tokens",
            description="Manage the headend's REST tokens (roles viewer, operator, admin) in "
            "its token file. A running headend picks up changes within a second and records "
            "them in its audit trail.",
            add_arguments=add_tokens_arguments,
            run=cmd_tokens,
        ),
        CommandType(
            name="demo",
            help="headend on SQLite plus simulated gateway agents",
            description="Run the headend on the embedded SQLite default with a "
            "gateway agent of simulated assets per site, and print what to try. The default "
            "example is a mixed fleet (PV + battery, wind, EV chargers); --example batteries "
            "runs five batteries on two sites.",
            add_arguments=_add_demo_arguments,
            run=cmd_demo,
        ),
    ]
