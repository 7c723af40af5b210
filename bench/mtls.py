"""What mutual TLS costs the agent link: ingest and dispatch through the headend's TLS
front, through gRPC's own TLS, and in plaintext, on the same fleet in the same run.

Three headends, one after another, each on a fresh SQLite database (the default):

* ``plaintext``: no TLS (the baseline; in the table its figure is the "raw" column);
* ``front``: ``HEADEND_CLIENT_CA`` with ``HEADEND_MTLS_MODE=front`` (the default): the
  headend's TLS front (:mod:`der_sdk_headend.link.tls_front`) runs every handshake,
  audits refusals and relays the bytes of accepted connections to the gRPC server on a
  loopback port, in Python, on the headend's event loop;
* ``native``: ``HEADEND_MTLS_MODE=native``: ``grpc.ssl_server_credentials(...,
  require_client_auth=True)``, TLS inside gRPC's C core, no relay, no audit of refused
  handshakes.

Every agent of the fleet (1,000 streams, 5 assets each) has its own client certificate
from a development CA, bound to its site by fingerprint in the mutual TLS inventory; the
load generator opens each channel with it (:class:`bench.loadgen.ClientTls`). Per mode:

1. **stored ingest**: the fleet sends flat out, as :mod:`bench.ingest` measures it
   (samples/s acknowledged after commit, after a warm-up);
2. **dispatch latency, idle**: ``POST /dispatch`` → the agent's ``SetpointOutcomeAck``,
   one at a time to random assets of the same connected fleet, as :mod:`bench.dispatch`
   measures it (REST over HTTPS in the TLS modes, one keep-alive connection);
3. **dispatch latency at ingest load**: the same, while a second process (its own 200
   agents x 5 assets, with certificates in the TLS modes) sends telemetry at half the
   plaintext headend's stored rate from step 1: the same offered load in every mode.

The figures of ``front`` and ``native`` carry the plaintext figure as their raw value;
the ratio is mode / plaintext (for latencies, lower is better).

Before those, a **reconnect storm** in each mode (:func:`run_storms`): 5,000 agents x 1
asset, each with its own client certificate in the TLS modes, start at one wall-clock
instant from one client process (:func:`bench.fleet.storm`), against a fresh headend
with that inventory. The figures are the seconds until the last agent has its
RegisterAck and the failed first attempts (agents that had to retry: a refused or broken
handshake, a failed stream). The TLS modes carry ``native`` as their raw value: the goal
is every agent registered within :data:`STORM_GOAL_RATIO` x the native time, with no
failed first attempt, in whichever mode is the default. ``DER_BENCH_MTLS=storm`` (or
``load``) runs one part only; ``DER_BENCH_MTLS_STORM_AGENTS`` sets another storm size.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path
from typing import Any

import yaml

from bench import profiling
from bench.common import Context, CpuMeter, Figure, headend, summary_ms
from bench.dispatch import (
    GAP_S,
    HttpClient,
    _dispatches,
    _kill,
    _Outcomes,
    _round,
    _start_loadgen,
)
from bench.fleet import STORM_CLIENTS, storm
from bench.ingest import measure
from bench.loadgen import ClientTls, Fleet, FleetSpec, make_fleet
from der_sdk import certs

__all__ = ["MODES", "STORM_GOAL_RATIO", "run", "run_storms"]

MODES = ("plaintext", "front", "native")
LABELS = {"front": "TLS front", "native": "gRPC native TLS"}
DEFAULT_MODE = "front"
"""``HEADEND_MTLS_MODE``'s default (:class:`der_sdk_headend.config.HeadendConfig`)."""
STORM_MODES = ("plaintext", "native", "front")
STORM_GOAL_RATIO = 1.3
"""A storm under mutual TLS may take at most this many times the native-TLS storm."""


def make_pki(directory: Path, spec: FleetSpec) -> dict[str, str]:
    """A development CA, the headend's certificate and one client certificate per agent
    of ``spec`` in ``directory``; each site's agent fingerprint by site id."""
    certs.init_ca(directory)
    certs.issue_headend(directory, ["127.0.0.1", "localhost"])
    return {
        agent.site_id: certs.issue_agent(
            directory, agent.site_id, agent_id=agent.agent_id
        ).fingerprint
        for agent in spec.agents
    }


def write_inventory(path: Path, spec: FleetSpec, bindings: dict[str, str] | None) -> Path:
    """The inventory of ``spec``; with ``bindings`` each site lists its agent's
    fingerprint (mutual TLS serves only bound sites)."""
    inventory = spec.inventory()
    if bindings is not None:
        for site in inventory["sites"]:
            site["agents"] = [{"fingerprint": bindings[site["site_id"]]}]
    path.write_text(yaml.safe_dump(inventory, sort_keys=False))
    return path


def _headend_env(mode: str, pki: Path) -> dict[str, str]:
    if mode == "plaintext":
        return {}
    return {
        "HEADEND_TLS_CERT": str(pki / "headend.pem"),
        "HEADEND_TLS_KEY": str(pki / "headend.key"),
        "HEADEND_CLIENT_CA": str(pki / certs.CA_CERT_FILE),
        "HEADEND_MTLS_MODE": mode,
    }


async def _one_mode(
    ctx: Context,
    mode: str,
    spec: FleetSpec,
    load_spec: FleetSpec,
    pki: Path,
    tls: ClientTls,
    shape: dict[str, Any],
    load_rate: float | None,
) -> dict[str, Any]:
    """Ingest flat out, then dispatch idle and at ``load_rate`` (``None``: half of what
    this headend stored flat out), against one headend in ``mode``."""
    secure = mode != "plaintext"
    folder = ctx.scratch(f"mtls-{mode}")
    inventory = write_inventory(
        folder / "assets.yaml",
        FleetSpec(spec.agents + load_spec.agents),
        shape["bindings"] if secure else None,
    )
    _, load_path = load_spec.write(folder / "load")
    rest_tls = ssl.create_default_context(cafile=str(pki / certs.CA_CERT_FILE)) if secure else None
    url = f"sqlite:///{folder / 'der.db'}"
    outcomes = _Outcomes()
    asset_ids = [a for agent in spec.agents for a in agent.asset_ids]
    count = shape["dispatches"]
    async with headend(
        ctx, f"mtls-{mode}", inventory, url, _headend_env(mode, pki), rest_tls
    ) as process:
        pid = process.pid
        assert pid is not None
        fleet = Fleet(
            spec,
            process.grpc_addr,
            ticks_per_batch=20,
            window=8,
            on_outcome_ack=outcomes,
            tls=tls if secure else None,
        )
        client = await HttpClient(process.host, process.http_port, rest_tls).open()
        try:
            connect_s = await fleet.connect(timeout_s=120, concurrency=200)
            ingest = await measure(
                ctx, fleet, shape["warmup_s"], shape["seconds"], {"headend": pid}
            )
            ingest["connect_s"] = round(connect_s, 2)
            ctx.say(
                f"{mode}: {len(fleet.agents)} streams connected in {connect_s:.1f} s, "
                f"stored ingest {ingest['samples_per_s']:,.0f} samples/s"
            )

            await _dispatches(client, outcomes, asset_ids, count // 5)  # warm-up
            meter = CpuMeter({"headend": pid, "bench": os.getpid()})
            meter.start()
            idle = await _dispatches(client, outcomes, asset_ids, count)
            idle_cpu = meter.stop()

            rate = load_rate if load_rate is not None else ingest["samples_per_s"] / 2
            load = await _start_loadgen(
                process.grpc_addr,
                load_path,
                3600,
                rate,
                folder / "loadgen.log",
                pki if secure else None,
            )
            try:
                await asyncio.sleep(shape["warmup_s"])
                meter = CpuMeter({"headend": pid, "loadgen": load.pid, "bench": os.getpid()})
                meter.start()
                loaded = await _dispatches(client, outcomes, asset_ids, count)
                loaded_cpu = meter.stop()
            finally:
                await _kill(load)
        finally:
            await client.close()
            await fleet.close()
    idle_ms = _round(summary_ms(idle["latencies_s"]))
    loaded_ms = _round(summary_ms(loaded["latencies_s"]))
    ctx.say(
        f"{mode}: dispatch idle p50 {idle_ms['p50_ms']:.2f} ms, p99 {idle_ms['p99_ms']:.2f} ms; "
        f"at {rate:,.0f} samples/s offered p99 {loaded_ms['p99_ms']:.2f} ms"
    )
    return {
        "ingest": ingest,
        "dispatch_idle": {**idle_ms, "timeouts": idle["timeouts"], **idle_cpu},
        "dispatch_loaded": {
            **loaded_ms,
            "timeouts": loaded["timeouts"],
            "ingest_offered_samples_per_s": round(rate),
            **loaded_cpu,
        },
    }


def _storm_summary(mode: str, r: dict[str, Any]) -> str:
    last = r["last_registered_any_s"]
    samples = f"; e.g. {r['error_samples'][:3]}" if r["error_samples"] else ""
    failing = [(second, n) for second, n in r["failed_by_second"] if n]
    return (
        f"storm, {mode}: {r['registered']}/{r['agents']} registered, last at {last:.2f} s, "
        f"{r['retried_agents']} failed first attempts {r['errors'] or ''}; headend CPU "
        f"{r['server_cpu_s']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB"
        + (
            f"; failed (second, count) {failing[:6]}{'...' if len(failing) > 6 else ''}"
            if failing
            else ""
        )
        + samples
    )


async def run_storms(ctx: Context) -> list[Figure]:
    """The reconnect storm in every mode (plaintext, native, front; fresh headend each)."""
    agents = int(os.environ.get("DER_BENCH_MTLS_STORM_AGENTS", 30 if ctx.quick else 5000))
    deadline_s = 20.0 if ctx.quick else 120.0
    spec = make_fleet(agents, 1, prefix="mtls-storm")
    pki = ctx.scratch("mtls-storm-pki")
    ctx.say(f"storm: {agents} agents x 1 asset at once, each with its own client certificate")
    bindings = await asyncio.to_thread(make_pki, pki, spec)
    results: dict[str, dict[str, Any]] = {}
    for mode in STORM_MODES:
        secure = mode != "plaintext"
        folder = ctx.scratch(f"mtls-storm-{mode}")
        _, fleet_path = spec.write(folder)
        inventory = write_inventory(folder / "assets.yaml", spec, bindings if secure else None)
        rest_tls = (
            ssl.create_default_context(cafile=str(pki / certs.CA_CERT_FILE)) if secure else None
        )
        db = folder / "der.db"
        env = _headend_env(mode, pki)
        async with headend(
            ctx, f"mtls-storm-{mode}", inventory, f"sqlite:///{db}", env, rest_tls
        ) as process:
            assert process.pid is not None
            seconds_profiled = 5 if ctx.quick else 20
            async with profiling.maybe(ctx, f"mtls-storm-{mode}", process.pid, seconds_profiled):
                results[mode] = await storm(
                    ctx,
                    spec,
                    fleet_path,
                    process.grpc_addr,
                    process.pid,
                    STORM_CLIENTS,
                    deadline_s,
                    db,
                    ("--tls", str(pki)) if secure else (),
                )
        ctx.say(_storm_summary(mode, results[mode]))

    def seconds(mode: str) -> float:
        last = results[mode]["last_registered_s"]
        return float(last) if last is not None else deadline_s

    native = seconds("native")
    plain = seconds("plaintext")
    summary = {
        mode: {
            "all_registered_s": results[mode]["last_registered_s"],
            "failed_first_attempts": results[mode]["retried_agents"],
            "errors": results[mode]["errors"],
            "headend_cpu_s": results[mode]["server_cpu_s"],
        }
        for mode in results
    }
    common = {
        "agents": agents,
        "clients": STORM_CLIENTS,
        "measure": "seconds from one wall-clock instant (every agent starts then) until the "
        "last RegisterAck; a failed attempt is retried with the agent's backoff",
        "default_mode": DEFAULT_MODE,
        "modes": summary,
    }
    figures: list[Figure] = []
    for mode in ("front", "native"):
        value = seconds(mode)
        failed = results[mode]["retried_agents"]
        # the front is held to native TLS; native TLS itself is shown beside plaintext
        base, base_label = (native, "gRPC native TLS") if mode == "front" else (plain, "plaintext")
        default = " (the default mode)" if mode == DEFAULT_MODE else ""
        all_in = results[mode]["last_registered_s"] is not None
        figures.append(
            Figure(
                name=f"mutual TLS storm, {LABELS[mode]}: all registered",
                value=round(value, 2),
                unit="s",
                goal=(
                    f"{agents:,} agents at once: all registered within "
                    f"{STORM_GOAL_RATIO:g}x the native-TLS storm{default}"
                    if mode == "front"
                    else "none: what native TLS costs beside plaintext"
                ),
                met=all_in and value <= STORM_GOAL_RATIO * native if mode == "front" else None,
                raw=round(base, 2),
                raw_label=f"{base_label}, same storm",
                ratio=round(value / base, 2) if base else None,
                details={
                    **common,
                    "mode": mode,
                    "ratio_to_native": round(value / native, 2) if native else None,
                    "ratio_to_plaintext": round(value / plain, 2) if plain else None,
                    "measured": results[mode],
                },
            )
        )
        figures.append(
            Figure(
                name=f"mutual TLS storm, {LABELS[mode]}: failed first attempts",
                value=failed,
                unit="agents",
                goal=f"0 of {agents:,}{default}",
                met=failed == 0,
                raw=results["plaintext"]["retried_agents"],
                raw_label="plaintext, same storm",
                ratio=None,
                details={**common, "mode": mode, "errors": results[mode]["errors"]},
            )
        )
    return figures


async def run(ctx: Context) -> list[Figure]:
    parts = os.environ.get("DER_BENCH_MTLS", "storm,load").split(",")
    figures = await run_storms(ctx) if "storm" in parts else []
    if "load" in parts:
        figures += await run_load(ctx)
    return figures


async def run_load(ctx: Context) -> list[Figure]:
    """Ingest and dispatch in every mode (see the module's docstring)."""
    if ctx.quick:
        spec, load_spec = make_fleet(20, 5, prefix="mtls"), make_fleet(10, 5, prefix="mtls-load")
        shape: dict[str, Any] = {"warmup_s": 0.3, "seconds": 1.0, "dispatches": 10}
    else:
        spec = make_fleet(1000, 5, prefix="mtls")
        load_spec = make_fleet(200, 5, prefix="mtls-load")
        shape = {"warmup_s": 3.0, "seconds": 12.0, "dispatches": 500}
    ctx.say(
        f"{len(spec.agents)} agents x 5 assets, each with its own client certificate; "
        f"modes {', '.join(MODES)}; {shape['dispatches']} dispatches idle and at load "
        f"({len(load_spec.agents)} agents x 5 assets in a second process)"
    )
    pki = ctx.scratch("mtls-pki")
    everyone = FleetSpec(spec.agents + load_spec.agents)
    shape["bindings"] = await asyncio.to_thread(make_pki, pki, everyone)
    tls = await asyncio.to_thread(ClientTls.read, pki, spec)

    results: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        plain = results.get("plaintext")
        half = plain["ingest"]["samples_per_s"] / 2 if plain else None
        results[mode] = await _one_mode(ctx, mode, spec, load_spec, pki, tls, shape, half)

    plain = results["plaintext"]
    common = {
        "streams": len(spec.agents),
        "assets": spec.assets,
        "storage": "sqlite",
        "seconds": shape["seconds"],
        "dispatches": shape["dispatches"],
        "gap_ms": GAP_S * 1000,
        "load_streams": len(load_spec.agents),
        "ratio_note": "ratio = mode / plaintext, same fleet, same run",
    }
    figures: list[Figure] = []
    for mode in ("front", "native"):
        result, label = results[mode], LABELS[mode]
        ingest, plain_ingest = result["ingest"]["samples_per_s"], plain["ingest"]["samples_per_s"]
        figures.append(
            Figure(
                name=f"mutual TLS, {label}: SQLite stored ingest",
                value=round(ingest),
                unit="samples/s",
                goal="none: what mutual TLS costs",
                met=None,
                raw=round(plain_ingest),
                raw_label="plaintext, same fleet",
                ratio=round(ingest / plain_ingest, 3) if plain_ingest else None,
                details={
                    **common,
                    "mode": mode,
                    "measured": result["ingest"],
                    "plaintext": plain["ingest"],
                },
            )
        )
        for step, pct, what in (
            ("dispatch_idle", "p50", "idle"),
            ("dispatch_loaded", "p99", "at ingest load"),
        ):
            value, baseline = result[step][f"{pct}_ms"], plain[step][f"{pct}_ms"]
            figures.append(
                Figure(
                    name=f"mutual TLS, {label}: dispatch latency, {what} ({pct})",
                    value=round(value, 3),
                    unit="ms",
                    goal="none: what mutual TLS costs",
                    met=None,
                    raw=round(baseline, 3),
                    raw_label=f"plaintext, same fleet, {pct}",
                    ratio=round(value / baseline, 2) if baseline else None,
                    details={
                        **common,
                        "mode": mode,
                        "measured": result[step],
                        "plaintext": plain[step],
                    },
                )
            )
    return figures
