"""The Ray cluster that a sweep runs on, and how its trials reach the service.

``ray_cluster`` joins the cluster at ``--address``, or the one already initialised in this
process, or starts a local one (shut down on leaving).

The service's URL and write token in a trial (the Tune function and each Ray Train worker:
``ServiceAccess.in_trial``), by precedence:

1. ``HYPERLAW_URL`` / ``HYPERLAW_TOKEN`` in the trial process's own environment, when set and
   not empty. A Ray node's processes have the environment that ``ray start`` ran in
   (docker-compose.yml sets ``HYPERLAW_URL=http://api:8000`` on its Ray nodes), so on a
   cluster that the sweep joins, the URL set there wins over the driver's ``--url``, which
   names the service as the driver's machine sees it (http://localhost:8000, say); the driver
   logs the URL that its trials will use when it differs (``log_trial_service``).
2. Else the driver's: ``--url`` (else the driver's ``HYPERLAW_URL``) and its
   ``HYPERLAW_TOKEN``. A local cluster that the sweep starts itself has no environment of its
   own (it inherits the driver's): its trials use the driver's values.

The driver's values travel through Ray's object store, never in Tune's ``param_space`` (Tune
writes it to disk with every trial: params.json, the experiment state) nor in Ray Train's
``train_loop_config`` (kept in the run's state that the dashboard shows): Tune's
``with_parameters`` hands them to the Tune function, which hands them to its workers inside
their train function (which Ray Train puts in the object store). Nor in a ``runtime_env``'s
``env_vars``: Ray 2.60 logs every runtime env it creates, env_vars included, to
``runtime_env_agent.log`` among the session's logs on each node.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

logger = logging.getLogger(__name__)
URL_ENV, TOKEN_ENV = "HYPERLAW_URL", "HYPERLAW_TOKEN"
RAY_TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
RAY_TRAIN_POLL_S = 0.25  # telemetry.REPORT_INTERVAL_S stays above it


@dataclass(frozen=True)
class ServiceAccess:
    """The service as the sweep's driver reaches it; ``in_trial`` is a trial's (module
    docstring). ``trial_environment_wins`` is False on a local cluster that the sweep
    started."""

    url: str
    token: str | None = field(default=None, repr=False)  # out of reprs, hence of logs
    trial_environment_wins: bool = True

    def in_trial(self) -> ServiceAccess:
        """The URL and token this process (a trial) uses: its own ``HYPERLAW_URL`` and
        ``HYPERLAW_TOKEN`` where set and not empty, unless the sweep started the cluster;
        else the driver's."""
        if not self.trial_environment_wins:
            return self
        url = os.environ.get(URL_ENV) or self.url
        return replace(self, url=url, token=os.environ.get(TOKEN_ENV) or self.token)


@contextmanager
def ray_cluster(address: str | None, ray_init: dict[str, Any] | None) -> Iterator[bool]:
    """Join the cluster at ``address``, or the one already initialised, or start a local one
    (shut down on leaving). Yields whether it started one."""
    import ray

    if ray.is_initialized():
        yield False
        return
    if address:
        ray.init(address=address)
    else:
        # Ray Train's controller takes in one report per poll (2 s by default): a run that
        # lasts seconds (a packed one) would mostly wait for it. The local cluster's workers
        # inherit this process's environment.
        os.environ.setdefault(RAY_TRAIN_POLL_ENV, str(RAY_TRAIN_POLL_S))
        kwargs = {"include_dashboard": True, **(ray_init or {})}
        context = ray.init(**kwargs)
        if kwargs.get("include_dashboard") and getattr(context, "dashboard_url", None):
            logger.info("Ray dashboard: http://%s", context.dashboard_url)
    try:
        yield not address
    finally:
        ray.shutdown()


def _trial_environment() -> tuple[str | None, bool]:
    """A Ray task's HYPERLAW_URL, and whether it has a HYPERLAW_TOKEN (not the token)."""
    return os.environ.get(URL_ENV) or None, bool(os.environ.get(TOKEN_ENV))


def log_trial_service(driver: ServiceAccess) -> None:
    """On a cluster that the sweep joined, log the URL that its trials will use where it is
    not the driver's, and that they use the nodes' token where one is set: what a Ray task
    finds in its environment (one task, on whichever node Ray places it)."""
    import ray

    if not driver.trial_environment_wins:
        return
    probe = ray.remote(num_cpus=0)(_trial_environment)
    url, has_token = ray.get(probe.remote())
    if url and url != driver.url:
        logger.info(
            "trials will report to %s (HYPERLAW_URL on the Ray nodes), not to %s",
            url,
            driver.url,
        )
    if has_token:
        logger.info("trials will use the HYPERLAW_TOKEN set on the Ray nodes")
