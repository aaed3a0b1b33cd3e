"""``/v1/experiments``: named groups of trials, each in a family (``server.families``), and
an experiment's trials and points as one CSV or Parquet file (``server.export``)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import IO, Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse

from server import crud, export, families
from server.api.deps import (
    Limit,
    ObjectId,
    Offset,
    ReadAuth,
    SessionDep,
    TextFilter,
    WriteAuth,
    require_read_apart,
)
from server.api.limits import JsonLimitsRoute
from server.schemas import (
    ExperimentCreate,
    ExperimentPublic,
    ExperimentsPublic,
    ExperimentUpdate,
)

router = APIRouter(prefix="/experiments", tags=["experiments"], route_class=JsonLimitsRoute)


@router.post(
    "",
    response_model=ExperimentPublic,
    status_code=201,
    dependencies=[WriteAuth],
    responses={
        200: {"description": "an experiment with this name exists; it is returned"},
        409: {"description": "it exists in another family than the one given"},
    },
)
def create_experiment(
    experiment_in: ExperimentCreate, session: SessionDep, response: Response
) -> ExperimentPublic:
    """Create an experiment, or return the existing one with the same name (200); a
    ``family`` given explicitly must be the existing one's (409 otherwise)."""
    experiment, created = crud.create_experiment(session=session, experiment_in=experiment_in)
    if not created:
        response.status_code = 200
    return ExperimentPublic.model_validate(experiment)


@router.get("", response_model=ExperimentsPublic, dependencies=[ReadAuth])
def list_experiments(
    session: SessionDep,
    name: TextFilter = None,
    family: TextFilter = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> ExperimentsPublic:
    rows, count = crud.list_experiments(
        session=session, name=name, family=family, limit=limit, offset=offset
    )
    return ExperimentsPublic(data=[ExperimentPublic.model_validate(r) for r in rows], count=count)


@router.get("/{experiment_id}", response_model=ExperimentPublic, dependencies=[ReadAuth])
def get_experiment(experiment_id: ObjectId, session: SessionDep) -> ExperimentPublic:
    return ExperimentPublic.model_validate(
        crud.get_experiment(session=session, experiment_id=experiment_id)
    )


@router.patch("/{experiment_id}", response_model=ExperimentPublic, dependencies=[WriteAuth])
def update_experiment(
    experiment_id: ObjectId, experiment_in: ExperimentUpdate, session: SessionDep
) -> ExperimentPublic:
    """Move the experiment, with all its trials, to another family; the fitting worker then
    refits every family."""
    return ExperimentPublic.model_validate(
        families.move_experiment(
            session=session, experiment_id=experiment_id, family=experiment_in.family
        )
    )


def _file_blocks(file: IO[bytes], size: int = 1 << 20) -> Iterator[bytes]:
    """The file from its start, a block at a time; closed (and so deleted) at the end."""
    with file:
        file.seek(0)
        while block := file.read(size):
            yield block


@router.get(
    "/{experiment_id}/export",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "one row per point with its trial's columns (a trial without "
            "points: one row, its point columns empty); extras as JSON text",
            "content": {
                "text/csv": {"schema": {"type": "string"}},
                "application/vnd.apache.parquet": {
                    "schema": {"type": "string", "format": "binary"}
                },
            },
        }
    },
)
def export_experiment(
    experiment_id: ObjectId,
    request: Request,
    _auth: Annotated[None, Depends(require_read_apart)],
    format: Annotated[Literal["csv", "parquet"], Query(description="csv or parquet")] = "csv",
) -> Response:
    """The experiment's trials and loss-curve points as one table, as an attachment named
    ``experiment-<id>.<format>``: CSV streamed as it is read (non-finite floats written
    ``NaN``, ``Infinity``, ``-Infinity``), or Parquet. The points are read in chunks, each in
    a short transaction of its own (``server.export``)."""
    database = request.app.state.database
    with database.session() as session:
        crud.get_experiment(session=session, experiment_id=experiment_id)  # 404 before a byte
    rows = export.export_rows(database, experiment_id)
    headers = {
        "Content-Disposition": f'attachment; filename="{export.filename(experiment_id, format)}"'
    }
    if format == "csv":
        return StreamingResponse(
            export.csv_chunks(rows), media_type=export.FORMATS["csv"], headers=headers
        )
    file = tempfile.TemporaryFile()
    try:
        export.write_parquet(rows, file)
    except BaseException:
        file.close()
        raise
    headers["Content-Length"] = str(file.tell())
    return StreamingResponse(
        _file_blocks(file), media_type=export.FORMATS["parquet"], headers=headers
    )
