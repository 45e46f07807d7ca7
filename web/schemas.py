"""Request and response schemas, declared once.

Bodies are strict (an integer is a JSON integer, unknown fields are refused);
query strings are parsed as the types they name.  Validation details, response
bodies and ``/openapi.json`` are all generated from these classes.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from shared.domain.orders import OrderStatus

MAX_ID = 2**63 - 1

Id = Annotated[int, Field(ge=1, le=MAX_ID)]
PointAmount = Annotated[int, Field(ge=1, le=1_000_000)]
Money = Annotated[int, Field(ge=0, le=1_000_000_000)]
Name = Annotated[str, Field(min_length=1, max_length=200)]
Timestamp = Annotated[
    str, Field(description="RFC 3339, UTC, milliseconds", examples=["2026-11-30T04:15:35.123Z"])
]

_INTEGER = re.compile(r"^[+-]?\d{1,30}$")


def _query_int(value: Any) -> Any:
    if isinstance(value, str):
        if not _INTEGER.match(value):
            raise ValueError("must be an integer")
        return int(value)
    return value


def _query_bool(value: Any) -> Any:
    if isinstance(value, str):
        if value not in ("true", "false"):
            raise ValueError("must be true or false")
        return value == "true"
    return value


QueryInt = BeforeValidator(_query_int)
QueryBool = BeforeValidator(_query_bool)


class Body(BaseModel):
    """A JSON request body: strict types, camelCase names, no unknown fields."""

    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        alias_generator=to_camel,
        validate_by_name=False,
        validate_by_alias=True,
    )


class Query(BaseModel):
    """A query string: values arrive as text and are parsed; unknown parameters are ignored."""

    model_config = ConfigDict(extra="ignore", alias_generator=to_camel, validate_by_alias=True)


class Out(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, serialize_by_alias=True, validate_by_name=True
    )


# ---- jobs -----------------------------------------------------------------


class JobAccepted(Out):
    job_id: str
    status: Literal["PENDING", "SUCCEEDED", "FAILED"]
    status_url: str


class ErrorInfo(Out):
    code: str
    message: str


class JobView(Out):
    job_id: str
    kind: Literal["POINTS_CHARGE", "POINTS_USE", "STOCK_SET", "ORDER_CREATE", "COUPON_ISSUE"]
    status: Literal["PENDING", "SUCCEEDED", "FAILED"]
    result: dict[str, Any] | None
    error: ErrorInfo | None
    created_at: Timestamp
    finished_at: Timestamp | None


class JobWaitQuery(Query):
    wait: Annotated[int, QueryInt, Field(ge=0, le=30)] = 0


# ---- points ---------------------------------------------------------------


class PointsRequest(Body):
    user_id: Id
    amount: PointAmount


class BalanceView(Out):
    user_id: int
    amount: int


class PointHistoryItem(Out):
    type: Literal["CHARGE", "USE"]
    amount: int
    balance_after: int
    created_at: Timestamp


T = TypeVar("T")


class Page(Out, Generic[T]):
    items: list[T]
    page: int
    size: int
    total: int


class PageQuery(Query):
    page: Annotated[int, QueryInt, Field(ge=1, le=MAX_ID)] = 1
    size: Annotated[int, QueryInt, Field(ge=1, le=100)] = 20


# ---- products -------------------------------------------------------------


class ProductCreate(Body):
    name: Name
    price: Money
    stock: Money


class ProductView(Out):
    id: int
    name: str
    price: int
    stock: int
    created_at: Timestamp
    updated_at: Timestamp


class ProductListQuery(PageQuery):
    name: Annotated[str, Field(max_length=200)] | None = None
    min_price: Annotated[int, QueryInt, Field(ge=0, le=1_000_000_000)] | None = None
    max_price: Annotated[int, QueryInt, Field(ge=0, le=1_000_000_000)] | None = None
    in_stock: Annotated[bool, QueryBool] | None = None
    sort: Literal["id", "name", "price", "createdAt"] = "id"
    order: Literal["asc", "desc"] = "asc"

    @model_validator(mode="after")
    def _price_bounds(self) -> ProductListQuery:
        if (
            self.min_price is not None
            and self.max_price is not None
            and self.min_price > self.max_price
        ):
            raise ValueError("minPrice must not exceed maxPrice")
        return self


class StockBody(Body):
    stock: Money


class StockQuery(Query):
    stock: Annotated[int, QueryInt, Field(ge=0, le=1_000_000_000)] | None = None


# ---- orders ---------------------------------------------------------------


class OrderLineIn(Body):
    product_id: Id
    quantity: Annotated[int, Field(ge=1, le=1_000)]


class OrderCreate(Body):
    user_id: Id
    order_lines: Annotated[list[OrderLineIn], Field(min_length=1, max_length=50)]

    @model_validator(mode="after")
    def _distinct_products(self) -> OrderCreate:
        seen: set[int] = set()
        for line in self.order_lines:
            if line.product_id in seen:
                raise ValueError(f"productId {line.product_id} appears more than once")
            seen.add(line.product_id)
        return self


class OrderLineView(Out):
    product_id: int
    quantity: int
    unit_price: int


class OrderView(Out):
    id: int
    user_id: int
    status: OrderStatus
    version: int
    total_price: int
    order_lines: list[OrderLineView]
    created_at: Timestamp
    updated_at: Timestamp


class StatusQuery(Query):
    status: OrderStatus

    model_config = ConfigDict(extra="ignore", use_enum_values=False)


class OrderStatusView(Out):
    order_id: int
    status: OrderStatus
    version: int


class OrderHistoryItem(Out):
    status: OrderStatus
    created_at: Timestamp


class OrderHistoryList(Out):
    items: list[OrderHistoryItem]


# ---- coupons --------------------------------------------------------------


class CouponCreate(Body):
    name: Name
    discount_amount: Annotated[int, Field(ge=1, le=1_000_000_000)]
    total_quantity: Annotated[int, Field(ge=1, le=10_000_000)]


class CouponView(Out):
    id: int
    name: str
    discount_amount: int
    total_quantity: int
    issued_quantity: int
    remaining: int


class IssueBody(Body):
    user_id: Id


class IssueQuery(Query):
    user_id: Annotated[int, QueryInt, Field(ge=1, le=MAX_ID)] | None = None


class UserCouponItem(Out):
    user_coupon_id: int
    coupon_id: int
    name: str
    discount_amount: int
    issued_at: Timestamp


class UserCouponList(Out):
    items: list[UserCouponItem]


# ---- operations -----------------------------------------------------------


class Health(Out):
    status: Literal["ok"]


class ReadinessChecks(Out):
    database: Literal["ok", "down"]
    cache: Literal["ok", "down"]
    broker: Literal["ok", "down"]


class Readiness(Out):
    status: Literal["ok", "unavailable"]
    checks: ReadinessChecks


class ErrorDetail(Out):
    field: str
    message: str


class ErrorBodyInner(Out):
    code: str
    message: str
    details: list[ErrorDetail] | dict[str, Any] | None = None


class ErrorBody(Out):
    error: ErrorBodyInner
