"""``/v1/imports``: past runs into the trial store over the API, so that nobody needs the
database's credentials to import them (``hyperlaw import runs FILE --url URL``).

``POST /v1/imports/runs`` takes the generic runs CSV (``fitting.data``, as ``hyperlaw import
runs`` reads it) as a ``text/csv`` body, bounded by ``HYPERLAW_MAX_BODY_BYTES``, and stores
it with ``server.importers`` in one transaction: 201 with the counts, or a 422 naming every
bad line (``{"field": "line 7: learning_rate", "rule": "gt", "message": ...}``) and
storing nothing. Its trials' keys are those of the same file imported from the command
line: importing it again, either way, adds nothing.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import Field, ValidationError

from client.wire import DEFAULT_FAMILY
from fitting.csv_rows import RunsCsvError
from server.api.deps import SessionDep, WriteAuth
from server.core.errors import FieldError, InputError
from server.importers import import_runs_body
from server.schemas import FAMILY_NOTE, ExperimentCreate, OutModel

router = APIRouter(prefix="/imports", tags=["imports"])

#: A 422 lists at most this many bad lines' rules, then says how many more there are.
MAX_LISTED = 1000
CSV_COLUMNS = (
    "n_params, n_tokens, seq_len, learning_rate, batch_size_tokens, final_loss; optionally "
    "steps_to_target, target_loss, trial_id"
)


class RunsImportPublic(OutModel):
    """What an import stored."""

    experiment_id: int
    experiment: str
    family: str = Field(description=FAMILY_NOTE)
    created: int = Field(description="trials created")
    existing: int = Field(description="trials already there (the file was imported before)")


def _problems(exc: RunsCsvError) -> InputError:
    """The CSV's bad lines as a 422: one entry per broken rule, at most ``MAX_LISTED``."""
    errors = [
        FieldError(
            field=f"line {p.line}" + (f": {p.column}" if p.column else ""),
            rule=p.rule,
            message=f"line {p.line}: {p.message}",
        )
        for p in exc.problems[:MAX_LISTED]
    ]
    more = len(exc.problems) - MAX_LISTED
    if more > 0:
        errors.append(FieldError("body", "too_many_errors", f"{more} more problems not listed"))
    return InputError(errors)


@router.post(
    "/runs",
    response_model=RunsImportPublic,
    status_code=201,
    dependencies=[WriteAuth],
    description=(
        f"Import a runs CSV (columns {CSV_COLUMNS}; nan or inf loss for a diverged run) into "
        "the experiment, created in the family if new: all or nothing, every bad line named "
        "in the 422 (field 'line N: column')."
    ),
    responses={
        409: {"description": "the experiment exists in another family"},
        415: {"description": "the body was not sent as Content-Type: text/csv"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"text/csv": {"schema": {"type": "string"}}},
        }
    },
)
async def import_runs(
    request: Request,
    session: SessionDep,
    experiment: Annotated[str, Query(description="experiment to import into")],
    family: Annotated[str, Query(description=FAMILY_NOTE)] = DEFAULT_FAMILY,
) -> RunsImportPublic:
    """The body must be sent as ``Content-Type: text/csv`` (415 otherwise)."""
    try:  # the experiment's own rules, its name's and its family's, named as the query's
        ExperimentCreate(name=experiment, family=family)
    except ValidationError as exc:
        names = {"name": "experiment"}
        raise RequestValidationError(
            [
                {**e, "loc": ("query", names.get(str(e["loc"][0]), str(e["loc"][0])))}
                for e in exc.errors(include_url=False)
            ]
        ) from None
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "text/csv":
        shown = f"Content-Type {media_type!r}" if media_type else "no Content-Type"
        raise HTTPException(415, f"runs must be sent as text/csv (got {shown})")
    body = await request.body()

    def store() -> tuple[int, int, int]:
        try:
            return import_runs_body(
                session=session, data=body, experiment=experiment, family=family
            )
        except RunsCsvError as exc:
            raise _problems(exc) from None

    experiment_id, created, existing = await run_in_threadpool(store)
    return RunsImportPublic(
        experiment_id=experiment_id,
        experiment=experiment,
        family=family,
        created=created,
        existing=existing,
    )
