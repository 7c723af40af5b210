"""A headend replica's part in a cluster (``HEADEND_BUS_URL``, docs/cluster.md).

Replicas are ordinary headends that share PostgreSQL (the record of dispatches, sessions
and history) and a message bus (:mod:`der_sdk.bus`). :class:`Cluster` holds this replica's
bus connection and carries the commands replicas send each other; the parts that use it
live beside it in this package.
"""

from der_sdk_headend.cluster.core import Cluster, replica_name

__all__ = ["Cluster", "replica_name"]
