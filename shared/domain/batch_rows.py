"""A batch's rows as array parameters, so a batch statement compiles once for any batch.

SQLAlchemy's ``values(...).data(rows)`` puts the rows into the statement itself: every
batch is a new statement, compiled by SQLAlchemy and converted by psycopg again (in the
mixed load that was an eighth of the worker's CPU).  ``unnest`` of one array per
column keeps the text fixed; the arrays zip in order.

An ``UPDATE .. FROM unnest(..)`` also names its rows' keys with ``= ANY(keys)``
(``batch_keys``): joined only to the unnest, the planner may hash the whole table
(a sequential scan per batch, its cost growing with the table, chosen whenever the
table's statistics are young: a fresh day's job partition, a new shop), where the
keys make it an index lookup per row whatever the statistics say.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, func, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql.expression import ColumnElement, Subquery
from sqlalchemy.types import TypeEngine


def unnest_rows(name: str, **columns: TypeEngine[Any]) -> Subquery:
    """``(SELECT unnest(:<name>_a) AS a, unnest(:<name>_b) AS b, ...) AS <name>``.

    Execute with one list per column, each under ``<name>_<column>`` (``rows_params``).
    """
    return select(
        *(
            func.unnest(bindparam(f"{name}_{column}", type_=ARRAY(type_))).label(column)
            for column, type_ in columns.items()
        )
    ).subquery(name=name)


def any_of(param: str, type_: TypeEngine[Any]) -> ColumnElement[Any]:
    """``ANY(:<param>)``, ``param`` one array of ``type_``: ``table.c.key == any_of(...)``
    finds a batch's rows by key in one statement whatever the batch size."""
    return func.any(bindparam(param, type_=ARRAY(type_)))


def batch_keys(name: str, column: str, type_: TypeEngine[Any]) -> ColumnElement[Any]:
    """``ANY(:<name>_<column>)``: the key column of ``unnest_rows(name, ...)`` as an array,
    for ``table.c.key == batch_keys(...)`` beside the join to the unnest (module doc)."""
    return any_of(f"{name}_{column}", type_)


def rows_params(
    name: str, rows: list[tuple[Any, ...]], columns: tuple[str, ...]
) -> dict[str, list[Any]]:
    """The parameters of ``unnest_rows(name, ...)`` for ``rows`` (tuples in ``columns`` order)."""
    by_column: list[list[Any]] = [[] for _ in columns]
    for row in rows:
        for values, value in zip(by_column, row, strict=True):
            values.append(value)
    return {f"{name}_{column}": values for column, values in zip(columns, by_column, strict=True)}
