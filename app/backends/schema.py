"""Column types whose storage differs by database."""

from __future__ import annotations

from sqlalchemy import BigInteger, Integer

__all__ = ["POSITION"]

#: A log position: BIGINT, but on SQLite an INTEGER, so that a primary key of it is the
#: table's own rowid (no second b-tree).
POSITION = BigInteger().with_variant(Integer(), "sqlite")
