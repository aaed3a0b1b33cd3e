"""The body of ``GET /v1/recommendations`` (pydantic v2; conventions as in ``server.schemas``)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from pydantic import Field, WithJsonSchema

from server.schemas import NONFINITE_NOTE, OutModel

#: A float the body may hold as NaN or ±inf, written "NaN"/"Infinity"/"-Infinity"
#: (NONFINITE_NOTE): the document says so, so that a body with one matches its schema.
WireFloat = Annotated[
    float,
    WithJsonSchema(
        {
            "anyOf": [{"type": "number"}, {"enum": ["NaN", "Infinity", "-Infinity"]}],
            "description": NONFINITE_NOTE,
        }
    ),
]


class IntervalPublic(OutModel):
    """A prediction interval: where the optimum of a new (N, D) group lies, from the laws'
    bootstrap over groups plus the groups' own scatter about the laws
    (``fitting.intervals``)."""

    low: WireFloat = Field(description="lower end; NaN when the fit kept no bootstrap draws")
    high: WireFloat = Field(description="upper end; NaN when the fit kept no bootstrap draws")
    level: float = Field(
        description="the probability that a new group's optimum lies in [low, high], e.g. 0.9"
    )


class CbsLawPublic(OutModel):
    """The law the critical batch size was evaluated from, B* = c·N^β·D^γ (tokens)."""

    coefficient: WireFloat = Field(description="c, tokens at N = D = 1")
    n_params_exponent: WireFloat = Field(description="β; 0 when the law is in D alone")
    n_tokens_exponent: WireFloat = Field(description="γ")
    n_params_exponent_interval: IntervalPublic | None = Field(
        description="90 % bootstrap interval of β over the groups; null for the loss "
        "surface's law (whose exponents are B*'s) or without draws"
    )
    n_tokens_exponent_interval: IntervalPublic | None = Field(
        description="90 % bootstrap interval of γ over the groups; null as for β"
    )
    n_groups: int | None = Field(
        description="(N, D) groups with measured steps to target the law was fitted to; null "
        "for the loss surface's law"
    )
    source: str = Field(description="the method, as sources.critical_batch_size_tokens says")


class RecommendationPublic(OutModel):
    """``GET /v1/recommendations``: η, B and the critical batch size for (N, D), from the
    newest ok recommender fit of the scope (formulas: ``fitting.recommender``). Batch sizes
    are in tokens unless the name says sequences."""

    n_params: float = Field(description="non-embedding parameters N, as queried")
    n_tokens: float = Field(description="training tokens D (the run's budget), as queried")
    seq_len: int = Field(description="tokens per sequence, as queried (default 2048)")
    learning_rate: float = Field(description="recommended peak learning rate η* at B*")
    learning_rate_interval: IntervalPublic = Field(description="interval of learning_rate")
    batch_size_tokens: float = Field(description="recommended global batch size B*, tokens")
    batch_size_tokens_interval: IntervalPublic = Field(
        description="interval of batch_size_tokens, tokens"
    )
    batch_size_sequences: float = Field(description="B* / seq_len, sequences")
    batch_size_sequences_interval: IntervalPublic = Field(
        description="interval of batch_size_sequences, sequences"
    )
    critical_batch_size_tokens: WireFloat = Field(
        description="critical batch size (Zhang et al., ε = 0.2), tokens: the largest B whose "
        "tokens to reach the loss of (η*, B*) at D are at most 1.2 times those of B*; "
        "Infinity when undefined for the fit (a warning says so)"
    )
    critical_batch_size_tokens_interval: IntervalPublic = Field(
        description="interval of critical_batch_size_tokens, tokens"
    )
    critical_batch_size_law: CbsLawPublic = Field(
        description="the law critical_batch_size_tokens was evaluated from: measured steps to "
        "target (Zhang et al.) when the family has them in 3 groups, else the loss surface's"
    )
    sources: dict[str, str] = Field(
        description="for each number above (and the imposed-batch ones), the method that "
        "produced it"
    )
    warnings: list[str] = Field(
        description="why to trust an answer less, each stating it: e.g. n_params or n_tokens "
        "outside the fitted range (extrapolation), with that range"
    )
    imposed_batch_size_tokens: float | None = Field(
        default=None, description="the batch_size_tokens query parameter; null without it"
    )
    learning_rate_for_batch: float | None = Field(
        default=None,
        description="best peak learning rate at the imposed batch size; null without one",
    )
    learning_rate_for_batch_interval: IntervalPublic | None = Field(
        default=None, description="interval of learning_rate_for_batch; null without one"
    )
    step_overhead: WireFloat | None = Field(
        default=None,
        description="extra optimizer steps at the imposed batch size versus the critical "
        "batch size, as a fraction (0.3 = 30 % more; paid below the CBS); null without one",
    )
    token_overhead: WireFloat | None = Field(
        default=None,
        description="extra training tokens at the imposed batch size versus the critical "
        "batch size, as a fraction (paid above the CBS); null without one",
    )
    family: str | None = Field(
        description="the family whose fit answered (scope family:<name>); null when an "
        "experiment's own fit answered"
    )
    fit_key: str | None = Field(
        description="the runs the answer is for: <family>[/mup][/<schedule>], the family's "
        "(or experiment's) main fit key"
    )
    fit_ids: list[int] = Field(description="ids of the fits the answer came from (/v1/fits)")
    fitted_at: dt.datetime = Field(description="when that fit was stored (UTC)")
    n_trials: int = Field(
        description="completed trials the fit used: for a family, every family's it borrowed "
        "exponents from (its quality in /v1/fits/{id} counts its own)"
    )
    scope: str = Field(description="the fit's scope: family:<name>, or experiment:<id>")
