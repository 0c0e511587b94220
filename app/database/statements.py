"""Statements kept as SQL and rows of parameters, to be made later by another connection (the
log's writer, maybe in another process)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import Insert

__all__ = ["compile_write"]


def compile_write(
    statement: ClauseElement,
    parameters: Sequence[Mapping[str, Any]] | Mapping[str, Any] | None,
    dialect: Dialect,
) -> tuple[str, list[list[Any]]]:
    """``statement`` as SQL with positional parameters, and a row of values per set of
    ``parameters`` (one row when there is one set, or none)."""
    rows: Sequence[Mapping[str, Any]]
    if parameters is None:
        rows = [{}]
    elif isinstance(parameters, Mapping):
        rows = [parameters]
    else:
        rows = parameters
    # An INSERT without values binds the columns its rows name (as execute() compiles it).
    keys = list(rows[0]) if isinstance(statement, Insert) and rows[0] else None
    compiled = cast(SQLCompiler, statement.compile(dialect=dialect, column_keys=keys))
    names = compiled.positiontup
    if names is None or "__[POSTCOMPILE" in compiled.string:
        raise TypeError(f"cannot keep this write to make later: {compiled.string}")
    return compiled.string, [
        [values[name] for name in names]
        for values in (compiled.construct_params(dict(row)) for row in rows)
    ]
