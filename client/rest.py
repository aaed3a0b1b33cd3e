"""A small, thread-safe Python client for the hyperlaw REST API.

>>> client = HyperlawClient("http://127.0.0.1:8000", token="hl_...")
>>> exp = client.ensure_experiment("lr-bs-sweep")
>>> trial = client.create_trial(experiment_id=exp["id"], n_params=..., idempotency_key="t0")
>>> client.post_points(trial["id"], [{"step": 1, "train_loss": 9.8}, ...])

Contract:
- Every method returns the parsed JSON body as a dict.
- Retries are bounded by time, not by count: a failed attempt is retried with exponential
  backoff and full jitter (a uniform draw in ``[0, min(2 s, backoff_s · 2^attempt)]``, at
  least ``Retry-After`` when the service sends one) until ``retry_for_s`` seconds have passed
  since the first attempt (default 60 s, or ``$HYPERLAW_CLIENT_RETRY_S``), which outlasts a
  restart of the service or of its database; then ``HyperlawUnavailable`` is raised.
  ``max_retries``, when given, also caps the number of retries.
- What is retried is what is safe to send again. Any request: a connection that could not
  be opened (nothing was sent), 429 and 503 (the service refused or rolled the request back).
  Idempotent requests also: a timeout or a connection lost after sending, 502 and 504 (the
  request may have been carried out). Every method of this client is idempotent: GET and
  PATCH are; point ingest is an upsert on (trial, step), experiments are get-or-create by
  name, ``create_trial`` sends an ``idempotency_key`` (a random one if the caller gives
  none) and a heartbeat only moves a timestamp. A plain ``request("POST", ...)`` is not,
  unless called with ``idempotent=True``.
- Any other answer of 400 or above raises ``HyperlawAPIError(status_code, detail)`` at once
  (a 500 is a fault that sending the request again will not mend).
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
from collections import Counter
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from client.wire import MAX_POINTS_PER_REQUEST, decode_nonfinite, dumps

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8000"
POST_CONCURRENCY = 2
#: how long a call keeps retrying unless told otherwise: longer than a restart of the service
#: (seconds: its start-up) or of its PostgreSQL (tests/server/test_faults.py)
DEFAULT_RETRY_S = 60.0
RETRY_ENV = "HYPERLAW_CLIENT_RETRY_S"
MAX_BACKOFF_S = 2.0  # cap of one backoff draw (Retry-After may ask for longer)

_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "PATCH", "DELETE"})
# answers that say the request was not carried out: safe to send again whatever it was
_RETRY_ANY = frozenset({429, 503})
# answers of a proxy or a gateway after which the request may have been carried out
_RETRY_IDEMPOTENT = frozenset({502, 504})
# transport failures before anything was sent: the connection could not be opened or pooled
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# transport failures after which the request may have been carried out
_MAYBE_SENT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


class HyperlawAPIError(Exception):
    """The API answered with an error that sending the request again will not mend (a 4xx
    other than 429, a 500, or a 502/504 to a request that is not idempotent)."""

    def __init__(self, status_code: int, detail: Any) -> None:
        super().__init__(f"HTTP {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


class HyperlawUnavailable(Exception):
    """The API could not be reached (or kept answering 429/502/503/504) for the whole retry
    budget, or a connection failed in a way that is not safe to retry."""


def _dumps(body: Any) -> bytes:
    return dumps(body).encode()


def _retry_budget(retry_for_s: float | None) -> float:
    """``retry_for_s``, else ``$HYPERLAW_CLIENT_RETRY_S``, else ``DEFAULT_RETRY_S``."""
    if retry_for_s is None:
        raw = os.environ.get(RETRY_ENV, "").strip()
        try:
            retry_for_s = float(raw) if raw else DEFAULT_RETRY_S
        except ValueError:
            raise ValueError(f"{RETRY_ENV} must be a number of seconds (got {raw!r})") from None
    if not retry_for_s >= 0:  # also refuses NaN
        raise ValueError(f"retry_for_s must be >= 0 seconds (got {retry_for_s})")
    return retry_for_s


def _retry_after_s(value: str | None) -> float:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date); 0 if none."""
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class HyperlawClient:
    """Client for ``/v1``; see the module docstring for retries, errors and encodings.

    ``timeout``: seconds of one attempt's connect/read/write; ``retry_for_s``: seconds from
    the first attempt after which no retry starts (None: ``$HYPERLAW_CLIENT_RETRY_S``, else
    60; 0: no retry); ``max_retries``: optional cap on retries per call besides the time;
    ``backoff_s``: the first backoff's upper bound, doubling per retry up to ``MAX_BACKOFF_S``.
    """

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        retry_for_s: float | None = None,
        max_retries: int | None = None,
        backoff_s: float = 0.2,
    ) -> None:
        self.base_url = (base_url or os.environ.get("HYPERLAW_URL") or DEFAULT_URL).rstrip("/")
        token = token if token is not None else os.environ.get("HYPERLAW_TOKEN")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.retry_for_s = _retry_budget(retry_for_s)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        self._rng = random.Random()
        self._lock = threading.Lock()
        self.retries = 0  # retried attempts so far, all threads together
        self.retry_causes: Counter[str] = Counter()  # why: "HTTP 503", "ConnectError", ...

    # -- plumbing ---------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HyperlawClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _backoff(self, attempt: int, retry_after: float) -> float:
        """Full jitter: uniform in [0, min(MAX_BACKOFF_S, backoff_s · 2^attempt)], at least
        what the service asked for."""
        ceiling = min(MAX_BACKOFF_S, self.backoff_s * 2.0 ** min(attempt, 30))
        with self._lock:
            draw = self._rng.uniform(0.0, ceiling)
        return max(draw, retry_after)

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        idempotent: bool | None = None,
        retry_for_s: float | None = None,
        content: bytes | None = None,
        content_type: str | None = None,
    ) -> dict[str, Any]:
        """One API call with retries; returns the decoded JSON body.

        ``idempotent``: whether sending the request twice does what sending it once does
        (None: by method, GET/HEAD/OPTIONS/PUT/PATCH/DELETE); ``retry_for_s``: this call's
        retry budget instead of the client's; ``content`` and ``content_type``: a body other
        than JSON, sent as it is."""
        method = method.upper()
        if idempotent is None:
            idempotent = method in _IDEMPOTENT_METHODS
        budget = self.retry_for_s if retry_for_s is None else retry_for_s
        if content is None and json_body is not None:
            content = _dumps(json_body)
        headers = {"Content-Type": content_type} if content_type else None
        if params is not None:
            params = {k: v for k, v in params.items() if v is not None}
        start = time.monotonic()
        attempt = 0
        while True:
            retry_after = 0.0
            try:
                response = self._http.request(
                    method, path, content=content, params=params, headers=headers
                )
            except httpx.TransportError as exc:
                cause, problem = type(exc).__name__, f"{type(exc).__name__}: {exc}"
                safe = isinstance(exc, _NOT_SENT) or (idempotent and isinstance(exc, _MAYBE_SENT))
                if not safe:
                    raise HyperlawUnavailable(
                        f"{method} {self.base_url}{path} failed and is not safe to retry: {problem}"
                    ) from exc
            else:
                status = response.status_code
                if status < 400:
                    return decode_nonfinite(response.json())
                try:
                    detail = response.json().get("detail")
                except (ValueError, AttributeError):
                    detail = response.text
                if not (status in _RETRY_ANY or (idempotent and status in _RETRY_IDEMPOTENT)):
                    raise HyperlawAPIError(status, detail)
                retry_after = _retry_after_s(response.headers.get("Retry-After"))
                cause, problem = f"HTTP {status}", f"HTTP {status}: {detail}"
            elapsed = time.monotonic() - start
            if elapsed >= budget or (self.max_retries is not None and attempt >= self.max_retries):
                raise HyperlawUnavailable(
                    f"{method} {self.base_url}{path} failed after {attempt + 1} attempts in "
                    f"{elapsed:.1f} s: {problem}"
                )
            delay = min(self._backoff(attempt, retry_after), budget - elapsed)
            log.debug(
                "%s %s failed (%s); retry %d in %.2f s", method, path, problem, attempt + 1, delay
            )
            with self._lock:
                self.retries += 1
                self.retry_causes[cause] += 1
            time.sleep(delay)
            attempt += 1

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
        return self.request("POST", "/v1/experiments", json_body=body, idempotent=True)

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
        keyed = fields["idempotency_key"] is not None
        return self.request("POST", "/v1/trials", json_body=fields, idempotent=keyed)

    def get_trial(self, trial_id: int) -> dict[str, Any]:
        return self.request("GET", f"/v1/trials/{trial_id}")

    def list_trials(self, **filters: Any) -> dict[str, Any]:
        """``{"data": [...], "count": N}``; filters: experiment_id, status, source,
        n_params_min/max, n_tokens_min/max, idempotency_key, limit, offset."""
        return self.request("GET", "/v1/trials", params=filters)

    def update_trial(self, trial_id: int, **fields: Any) -> dict[str, Any]:
        return self.request("PATCH", f"/v1/trials/{trial_id}", json_body=fields)

    def heartbeat(self, trial_id: int) -> dict[str, Any]:
        return self.request("POST", f"/v1/trials/{trial_id}/heartbeat", idempotent=True)

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
                # dicts as they are (a copy of each cost 15 % of the encoding)
                json_body={"points": [p if type(p) is dict else dict(p) for p in batch]},
                idempotent=True,  # an upsert on (trial, step)
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

    def import_runs_csv(
        self, data: bytes, *, experiment: str, family: str | None = None
    ) -> dict[str, Any]:
        """``POST /v1/imports/runs``: a runs CSV's bytes into ``experiment`` (of ``family``);
        idempotent (the trials' keys come from the file's bytes). A bad file raises
        ``HyperlawAPIError`` 422 whose ``detail`` names every bad line."""
        return self.request(
            "POST",
            "/v1/imports/runs",
            params={"experiment": experiment, "family": family},
            content=data,
            content_type="text/csv",
            idempotent=True,
        )

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
