"""Joining a Ray cluster for ``cpm serve --ray`` and ``cpm batch``.

With an address (``--ray-address``, or ``RAY_ADDRESS``) the command joins that cluster as a driver and leaves it
running afterwards; without one it starts a single-machine cluster for itself and stops it when done. A process
that is already connected (a test, a notebook) is used as it is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from cpm_infer.deps import require
from cpm_infer.errors import CpmError

log = logging.getLogger(__name__)


class ClusterError(CpmError):
    """The Ray cluster could not be reached or started."""


@contextmanager
def connected(address: str | None = None, *, num_cpus: int | None = None, verbose: bool = False) -> Iterator[bool]:
    """Connect to Ray for the duration of the block; yields whether the cluster is local to this command
    (started here, and stopped on exit)."""
    ray = require("ray", "ray")
    if ray.is_initialized():
        yield False
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    local = {"num_cpus": num_cpus, "_node_ip_address": "127.0.0.1"}  # a cluster of this machine only: loopback
    try:
        ray.init(
            address=address,
            **({} if address else local),
            include_dashboard=False,
            logging_level=logging.INFO if verbose else logging.WARNING,
            log_to_driver=verbose,
        )
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise ClusterError(f"cannot connect to {where}: {str(exc).splitlines()[0] if str(exc) else exc}") from exc
    log.info("connected to Ray: %s", ray.cluster_resources())
    try:
        yield address is None
    finally:
        ray.shutdown()
