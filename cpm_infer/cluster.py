"""Joining a Ray cluster for ``cpm serve --ray`` and ``cpm batch``.

With an address (``--ray-address``, or ``RAY_ADDRESS``) the command joins that cluster as a driver and leaves it
running afterwards; without one it starts a single-machine cluster for itself, on loopback, and stops it when done.
A process that is already connected (a test, a notebook) is used as it is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from cpm_infer.deps import require
from cpm_infer.errors import CpmError

log = logging.getLogger(__name__)


# Ray's switch for single-machine operation: its processes then listen on loopback only, nothing else can join.
_LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class ClusterError(CpmError):
    """The Ray cluster could not be reached or started."""


def prefer_loopback(address: str | None) -> None:
    """Call before Ray is imported: a cluster this command starts for itself (no address) listens on loopback,
    not on every interface of the machine (Ray reads the switch once, when it is imported)."""
    if not (address or os.environ.get("RAY_ADDRESS")):
        os.environ.setdefault(_LOCAL_ONLY, "0")


@contextmanager
def connected(address: str | None = None, *, num_cpus: int | None = None, verbose: bool = False) -> Iterator[bool]:
    """Connect to Ray for the duration of the block; yields whether the cluster is local to this command
    (started here, and stopped on exit)."""
    ray = require("ray", "ray")
    if ray.is_initialized():
        yield False
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        ray.init(
            address=address,
            num_cpus=None if address else num_cpus,
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
