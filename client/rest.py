"""A small, thread-safe Python client for the hyperlaw REST API.

>>> client = HyperlawClient("http://127.0.0.1:8000", token="hl_...")
>>> exp = client.ensure_experiment("lr-bs-sweep")
>>> trial = client.create_trial(experiment_id=exp["id"], n_params=..., idempotency_key="t0")
>>> client.post_points(trial["id"], [{"step": 1, "train_loss": 9.8}, ...])

Contract:
- Every method returns the parsed JSON body as a dict.
- Connection errors, 5xx and 429 are retried with exponential backoff
  (``backoff_s · 2^attempt``, capped at 10 s, honouring ``Retry-After``) up to
  ``max_retries`` times, then ``HyperlawUnavailable`` is raised. Any other 4xx raises
  ``HyperlawAPIError(status_code, detail)`` at once.
- Retries are safe: point ingest is an upsert, experiments are get-or-create by name and
  ``create_trial`` sends an ``idempotency_key`` (a random one if the caller gives none).
- Non-finite floats travel as the strings "NaN", "Infinity", "-Infinity" (the API's
  encoding); this client writes and reads them as Python floats.
- One instance may be shared by threads (``httpx.Client`` pools connections safely).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from client.wire import MAX_POINTS_PER_REQUEST, decode_nonfinite, dumps

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8000"
POST_CONCURRENCY = 2
_MAX_SLEEP_S = 10.0


class HyperlawAPIError(Exception):
    """The API refused the request (a 4xx other than 429)."""

    def __init__(self, status_code: int, detail: Any) -> None:
        super().__init__(f"HTTP {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


class HyperlawUnavailable(Exception):
    """The API could not be reached (or kept answering 5xx/429) after all retries."""


def _dumps(body: Any) -> bytes:
    return dumps(body).encode()


class HyperlawClient:
    """Client for ``/v1``; see the module docstring for retries, errors and encodings."""

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        max_retries: int = 5,
        backoff_s: float = 0.2,
    ) -> None:
        self.base_url = (base_url or os.environ.get("HYPERLAW_URL") or DEFAULT_URL).rstrip("/")
        token = token if token is not None else os.environ.get("HYPERLAW_TOKEN")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        self._rng = random.Random()
        self._lock = threading.Lock()
        self.retries = 0  # retried attempts so far, all threads together

    # -- plumbing ---------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HyperlawClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff_s * (2**attempt)
        if retry_after is not None:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass
        with self._lock:
            jitter = self._rng.uniform(0.5, 1.0)
            self.retries += 1
        time.sleep(min(delay, _MAX_SLEEP_S) * jitter)

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One API call with retries; returns the decoded JSON body."""
        content = _dumps(json_body) if json_body is not None else None
        if params is not None:
            params = {k: v for k, v in params.items() if v is not None}
        last_problem = "no attempt made"
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                response = self._http.request(method, path, content=content, params=params)
            except httpx.TransportError as exc:
                last_problem = f"{type(exc).__name__}: {exc}"
            else:
                status = response.status_code
                if status < 400:
                    return decode_nonfinite(response.json())
                try:
                    detail = response.json().get("detail")
                except ValueError:
                    detail = response.text
                if status != 429 and status < 500:
                    raise HyperlawAPIError(status, detail)
                retry_after = response.headers.get("Retry-After")
                last_problem = f"HTTP {status}: {detail}"
            if attempt < self.max_retries:
                log.debug("%s %s failed (%s); retry %d", method, path, last_problem, attempt + 1)
                self._sleep(attempt, retry_after)
        raise HyperlawUnavailable(
            f"{method} {self.base_url}{path} failed after {self.max_retries + 1} attempts: "
            f"{last_problem}"
        )

    # -- experiments ------------------------------------------------------------------------

    def ensure_experiment(
        self, name: str, description: str | None = None, family: str | None = None
    ) -> dict[str, Any]:
        """The experiment called ``name``, created if it does not exist, in ``family`` (the
        service's default family when None). An existing experiment of another family than
        the one given is refused (``HyperlawAPIError`` 409): move it with
        :meth:`update_experiment`."""
        body: dict[str, Any] = {"name": name, "description": description}
        if family is not None:
            body["family"] = family
        return self.request("POST", "/v1/experiments", json_body=body)

    def update_experiment(self, experiment_id: int, **fields: Any) -> dict[str, Any]:
        """``PATCH /v1/experiments/{id}``, e.g. ``family="team-a"`` to move it."""
        return self.request("PATCH", f"/v1/experiments/{experiment_id}", json_body=fields)

    def get_experiment(self, experiment_id: int) -> dict[str, Any]:
        return self.request("GET", f"/v1/experiments/{experiment_id}")

    def list_experiments(self, **filters: Any) -> dict[str, Any]:
        return self.request("GET", "/v1/experiments", params=filters)

    # -- trials -----------------------------------------------------------------------------

    def create_trial(self, **fields: Any) -> dict[str, Any]:
        """Create a trial; with the same ``idempotency_key`` in the same experiment the
        existing trial comes back. Without a key a random one is sent so retries are safe."""
        fields.setdefault("idempotency_key", f"client-{uuid.uuid4().hex}")
        return self.request("POST", "/v1/trials", json_body=fields)

    def get_trial(self, trial_id: int) -> dict[str, Any]:
        return self.request("GET", f"/v1/trials/{trial_id}")

    def list_trials(self, **filters: Any) -> dict[str, Any]:
        """``{"data": [...], "count": N}``; filters: experiment_id, status, source,
        n_params_min/max, n_tokens_min/max, idempotency_key, limit, offset."""
        return self.request("GET", "/v1/trials", params=filters)

    def update_trial(self, trial_id: int, **fields: Any) -> dict[str, Any]:
        return self.request("PATCH", f"/v1/trials/{trial_id}", json_body=fields)

    def heartbeat(self, trial_id: int) -> dict[str, Any]:
        return self.request("POST", f"/v1/trials/{trial_id}/heartbeat")

    # -- points -----------------------------------------------------------------------------

    def post_points(self, trial_id: int, points: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """Upsert points in batches of at most 10,000; returns ``{"trial_id", "count"}`` with
        the number of distinct steps sent.

        When the steps are distinct, up to ``POST_CONCURRENCY`` batches are in flight at
        once (encoding one batch overlaps the server storing the previous one); with
        repeated steps batches go one after another so the last row for a step wins.
        """
        points = list(points)
        steps = {int(p["step"]) for p in points}
        batches = [
            points[i : i + MAX_POINTS_PER_REQUEST]
            for i in range(0, len(points), MAX_POINTS_PER_REQUEST)
        ]

        def send(batch: list[Mapping[str, Any]]) -> None:
            self.request(
                "POST",
                f"/v1/trials/{trial_id}/points",
                json_body={"points": [dict(p) for p in batch]},
            )

        if len(batches) > 1 and len(steps) == len(points):
            with ThreadPoolExecutor(POST_CONCURRENCY, thread_name_prefix="hyperlaw-post") as pool:
                for future in [pool.submit(send, b) for b in batches]:
                    future.result()
        else:
            for batch in batches:
                send(batch)
        return {"trial_id": trial_id, "count": len(steps)}

    def get_points(
        self, trial_id: int, step_min: int | None = None, step_max: int | None = None
    ) -> dict[str, Any]:
        """All points with ``step_min <= step <= step_max`` (paged through), by step."""
        data: list[dict[str, Any]] = []
        page_size = 100_000
        while True:
            page = self.request(
                "GET",
                f"/v1/trials/{trial_id}/points",
                params={
                    "step_min": step_min,
                    "step_max": step_max,
                    "limit": page_size,
                    "offset": len(data),
                },
            )
            data.extend(page["data"])
            if len(data) >= page["count"] or not page["data"]:
                return {"trial_id": trial_id, "data": data, "count": len(data)}

    # -- fits and recommendations -----------------------------------------------------------

    def recommend(
        self, *, family: str | None = None, experiment: str | int | None = None, **params: Any
    ) -> dict[str, Any]:
        """``GET /v1/recommendations`` with n_params, n_tokens[, seq_len, batch_size_tokens],
        from the fit of ``family`` (default: the service's default family) or of one
        ``experiment`` (id or name), not both."""
        params.update(family=family, experiment=experiment)
        return self.request("GET", "/v1/recommendations", params=params)

    def families(self, **params: Any) -> dict[str, Any]:
        """``GET /v1/families``: every family with its data and the state of its fit."""
        return self.request("GET", "/v1/families", params=params)

    def latest_fit(self, kind: str | None = None, **filters: Any) -> dict[str, Any]:
        return self.request("GET", "/v1/fits/latest", params={"kind": kind, **filters})

    def list_fits(self, **filters: Any) -> dict[str, Any]:
        return self.request("GET", "/v1/fits", params=filters)

    def get_fit(self, fit_id: int) -> dict[str, Any]:
        return self.request("GET", f"/v1/fits/{fit_id}")
