"""The bus-mode metrics that docs/runbooks.md, deploy/prometheus/rules.yml and the Grafana
dashboard name are exposed by a real replica (the others: tests/test_runbooks.py)."""

from __future__ import annotations

import httpx

from tests.cluster.conftest import StartReplica
from tests.headend.headend_kit import eventually
from tests.ops_kit import BUS_ONLY_PREFIXES, exposed_metric_names, named_metrics


async def test_every_bus_metric_the_ops_files_name_is_exposed_by_a_replica(
    start_replica: StartReplica,
) -> None:
    replica = await start_replica("replica-a")
    exposed: set[str] = set()

    async def backlog_read() -> bool:
        # the stream's backlog figures appear once the monitor has read it (at start)
        async with httpx.AsyncClient(base_url=replica.http_url, timeout=10.0) as http:
            exposed.update(exposed_metric_names((await http.get("/metrics")).text))
        return "der_bus_stream_messages" in exposed

    await eventually(backlog_read, "the replica exposes the bus stream's backlog")
    named = {n: w for n, w in named_metrics().items() if n.startswith(BUS_ONLY_PREFIXES)}
    assert {"der_bus_connected", "der_cluster_replicas", "der_bus_stream_messages"} <= set(named)
    missing = {name: sorted(where) for name, where in named.items() if name not in exposed}
    assert missing == {}, "named but not exposed by a replica in bus mode"
