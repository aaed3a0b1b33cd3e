"""Reading CSV files all or nothing, for :mod:`fitting.data`'s importers: the file decoded as
UTF-8 (a byte-order mark dropped), rows with their line numbers as a text editor counts them
(header = line 1), and cells parsed with the rule they break named. Bytes that are not
UTF-8, a NUL byte, a line the csv module cannot read, a number beyond a float's range
(``1e400`` is not a divergence) or below it (``1e-400`` is not 0) are errors of the line
they are on, never a traceback or a silently changed value.

Each broken rule is also kept as a :class:`CsvProblem` (line, column, rule, sentence), for
callers that report them one field at a time (the service's 422 of ``POST
/v1/imports/runs``): a cell raises :class:`CellError`, which names its column and rule.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CsvProblem:
    """One broken rule: its ``line`` (header = 1), the ``column`` (None: the line or the file
    as a whole), the rule's name (``gt``, ``integer``, ``empty``, ``number``, ``finite``,
    ``float_range``, ``fields``, ``columns``, ...) and a sentence saying how."""

    line: int
    column: str | None
    rule: str
    message: str


class CellError(ValueError):
    """A cell breaks a rule: ``column`` and ``rule`` name them, the message says how."""

    def __init__(self, column: str, rule: str, message: str) -> None:
        super().__init__(message)
        self.column = column
        self.rule = rule


class RunsCsvError(ValueError):
    """A CSV of runs has bad rows. ``errors`` lists every one as ``(line_number, reason)``
    (a line's reasons joined by "; "); ``problems`` the same as :class:`CsvProblem`, one per
    broken rule (without them, one per line, rule ``row``).

    Line numbers count from 1 at the header line, as a text editor shows them.
    """

    def __init__(
        self,
        path: str,
        errors: list[tuple[int, str]],
        problems: list[CsvProblem] | None = None,
    ):
        self.path = path
        self.errors = list(errors)
        self.problems = (
            list(problems)
            if problems is not None
            else [CsvProblem(line, None, "row", reason) for line, reason in self.errors]
        )
        shown = "\n".join(f"  line {line}: {reason}" for line, reason in self.errors[:50])
        more = len(self.errors) - 50
        if more > 0:
            shown += f"\n  ... and {more} more"
        super().__init__(f"{path}: {len(self.errors)} bad row(s), nothing loaded:\n{shown}")

    @classmethod
    def of(cls, path: str, problems: list[CsvProblem]) -> RunsCsvError:
        """The error of these problems, ``errors`` holding one entry per line."""
        by_line: dict[int, list[str]] = {}
        for problem in problems:
            by_line.setdefault(problem.line, []).append(problem.message)
        return cls(path, [(line, "; ".join(m)) for line, m in by_line.items()], problems)


class StepsCsvError(ValueError):
    """Bad rows of a ``n_params,batch_size,steps`` CSV: ``errors`` is [(line, reason)]."""

    def __init__(self, path: str, errors: list[tuple[int, str]]):
        self.errors = errors
        shown = "\n".join(f"  line {line}: {reason}" for line, reason in errors[:50])
        super().__init__(f"{path}: {len(errors)} bad row(s):\n{shown}")


_NONFINITE_WORDS = {"nan", "inf", "infinity"}


def parse_float(text: str | None, name: str, *, allow_nonfinite: bool = False) -> float:
    """The cell as a float, or :class:`CellError` naming ``name`` and the rule. ``nan``/``inf``
    pass only with ``allow_nonfinite`` (a diverged run's loss), and only when written so."""
    if text is None or text.strip() == "":
        raise CellError(name, "empty", f"{name} is empty")
    try:
        value = float(text)
    except ValueError:
        raise CellError(name, "number", f"{name} is not a number: {text.strip()!r}") from None
    if not allow_nonfinite and not math.isfinite(value):
        raise CellError(name, "finite", f"{name} must be finite, got {text.strip()!r}")
    word = text.strip().lstrip("+-").lower()
    if not math.isfinite(value) and word not in _NONFINITE_WORDS:  # 1e400 is not a divergence
        raise CellError(name, "float_range", f"{name} is beyond a float's range: {text.strip()!r}")
    mantissa = word.split("e")[0]
    if value == 0 and mantissa.strip("0.") != "":  # 1e-400 would silently become 0
        raise CellError(name, "float_range", f"{name} is below a float's range: {text.strip()!r}")
    return value


def csv_text(
    path: Path, error: type[RunsCsvError] | type[StepsCsvError], data: bytes | None = None
) -> io.StringIO:
    """The file (or ``data``, its bytes, when given: ``path`` then only names them) as text
    (UTF-8, a byte-order mark dropped); bytes that are not UTF-8 or a NUL byte raise
    ``error`` naming the line they are on."""
    data = path.read_bytes() if data is None else data
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        problem = "not UTF-8 text (a binary or otherwise encoded file?)"
        raise error(str(path), [(line, problem)]) from None
    if "\0" in text:
        raise error(str(path), [(text.count("\n", 0, text.index("\0")) + 1, "holds a NUL byte")])
    return io.StringIO(text, newline="")


def csv_rows(reader: csv.DictReader, path: Path, error: type[ValueError]) -> Iterator[dict]:
    """The reader's rows; a line the csv module cannot read raises ``error`` naming it."""
    try:
        yield from reader
    except csv.Error as exc:  # e.g. a field over the csv module's size limit
        # the reader has not counted the line it failed on
        raise error(str(path), [(reader.line_num + 1, f"not a CSV row: {exc}")]) from None


def positive(text: str | None, name: str) -> float:
    value = parse_float(text, name)
    if value <= 0:
        raise CellError(name, "gt", f"{name} must be > 0, got {value:g}")
    return value


def positive_int(text: str | None, name: str) -> int:
    value = positive(text, name)
    if value != int(value):
        raise CellError(name, "integer", f"{name} must be an integer, got {value:g}")
    return int(value)


def read_rows(
    path: str | Path, required_columns: Iterable[str], data: bytes | None = None
) -> list[tuple[int, dict[str, str] | None, str | None]]:
    """``(line_number, row_dict, None)`` per good row, ``(line_number, None, problem)`` per
    row of the wrong length; raise RunsCsvError if columns are missing (rule ``columns``).
    ``data``: the file's bytes, read from ``path`` when None."""
    path = Path(path)
    with csv_text(path, RunsCsvError, data) as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in required_columns if c not in header]
        if missing:
            text = f"missing column(s): {', '.join(missing)}"
            raise RunsCsvError(str(path), [(1, text)], [CsvProblem(1, None, "columns", text)])
        rows: list[tuple[int, dict[str, str] | None, str | None]] = []
        for row in csv_rows(reader, path, RunsCsvError):
            # reader.line_num is the physical line the row ended on.
            if None in row:
                rows.append(
                    (
                        reader.line_num,
                        None,
                        f"{len(header) + len(row[None])} fields, header has {len(header)}",
                    )
                )
                continue
            if all((v is None or v.strip() == "") for v in row.values()):
                continue  # blank line
            if any(v is None for v in row.values()):
                n_fields = sum(v is not None for v in row.values())
                rows.append((reader.line_num, None, f"{n_fields} fields, header has {len(header)}"))
                continue
            rows.append((reader.line_num, row, None))
    return rows
