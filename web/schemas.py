"""Request and response schemas, declared once.

Bodies are strict (an integer is a JSON integer, unknown fields are refused);
query strings are parsed as the types they name.  Validation details, response
bodies and ``/openapi.json`` are all generated from these classes.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)
from pydantic.alias_generators import to_camel

from shared.domain.orders import OrderStatus
from shared.top_sellers_cache import MAX_TOP

MAX_ID = 2**63 - 1

Id = Annotated[int, Field(ge=1, le=MAX_ID)]
# A body id that may be left out; given, it is an id (JSON null is refused: types are strict).
OptionalId = Annotated[
    Id | None, WithJsonSchema({"type": "integer", "minimum": 1, "maximum": MAX_ID})
]
PointAmount = Annotated[int, Field(ge=1, le=1_000_000)]
Money = Annotated[int, Field(ge=0, le=1_000_000_000)]
# No control characters (PostgreSQL cannot store U+0000) and no bidi embeddings,
# overrides or isolates, which reorder how a name is displayed (CVE-2021-42574).
NAME_PATTERN = r"^[^\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]*$"
Name = Annotated[str, Field(min_length=1, max_length=200, pattern=NAME_PATTERN)]
Timestamp = Annotated[
    str, Field(description="RFC 3339, UTC, milliseconds", examples=["2026-11-30T04:15:35.123Z"])
]

# ASCII digits only (Python's \d also takes other scripts' digits, and int() parses
# them), matched in full (``$`` would let a trailing newline through).
_INTEGER = re.compile(r"[+-]?[0-9]{1,30}")


def _query_int(value: Any) -> Any:
    if isinstance(value, str):
        if not _INTEGER.fullmatch(value):
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


class JobPosition(Out):
    partition: str = Field(description="the partition queue that applies the job")
    ahead: int = Field(
        ge=0, le=10_000, description="PENDING jobs of the partition committed before this one"
    )


class JobView(Out):
    job_id: str
    kind: Literal[
        "POINTS_CHARGE", "POINTS_USE", "STOCK_SET", "ORDER_CREATE", "COUPON_ISSUE", "ORDER_PAY"
    ]
    status: Literal["PENDING", "SUCCEEDED", "FAILED"]
    result: dict[str, Any] | None
    error: ErrorInfo | None
    created_at: Timestamp
    finished_at: Timestamp | None
    position: JobPosition | None = Field(description="while PENDING; null once finished")


class JobWaitQuery(Query):
    wait: Annotated[int, Field(ge=0, le=30), QueryInt] = 0


# ---- points ---------------------------------------------------------------


class PointsRequest(Body):
    user_id: Id
    amount: PointAmount


class BalanceView(Out):
    user_id: int
    amount: int


class PointHistoryItem(Out):
    type: Literal["CHARGE", "USE", "PAYMENT"]
    amount: int
    balance_after: int
    order_id: int | None = Field(description="the order a PAYMENT paid; null otherwise")
    created_at: Timestamp


T = TypeVar("T")


class Page(Out, Generic[T]):
    items: list[T]
    page: int
    size: int
    total: int


MAX_PAGE_SIZE = 100
# The largest page whose OFFSET, (page - 1) * size, still fits PostgreSQL's bigint.
MAX_PAGE = MAX_ID // MAX_PAGE_SIZE + 1


class PageQuery(Query):
    page: Annotated[int, Field(ge=1, le=MAX_PAGE), QueryInt] = 1
    size: Annotated[int, Field(ge=1, le=MAX_PAGE_SIZE), QueryInt] = 20


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


class TopSellersQuery(Query):
    days: Annotated[int, Field(ge=1, le=30), QueryInt] = 3
    limit: Annotated[int, Field(ge=1, le=MAX_TOP), QueryInt] = 5


class TopSellerItem(Out):
    product_id: int
    name: str
    price: int
    units_sold: int


class TopSellersView(Out):
    items: list[TopSellerItem]
    days: int
    generated_at: Annotated[Timestamp, Field(description="when the ranking was computed")]


class ProductListQuery(PageQuery):
    name: Annotated[str, Field(max_length=200, pattern=NAME_PATTERN)] | None = None
    min_price: Annotated[int, Field(ge=0, le=1_000_000_000), QueryInt] | None = None
    max_price: Annotated[int, Field(ge=0, le=1_000_000_000), QueryInt] | None = None
    in_stock: Annotated[bool, QueryBool] | None = None
    sort: Literal["id", "name", "price", "createdAt"] = "id"
    order: Literal["asc", "desc"] = "asc"

    @field_validator("max_price")
    @classmethod
    def _price_bounds(cls, max_price: int | None, info: ValidationInfo) -> int | None:
        # A validator on the field itself, so the error names it (fields validate in order).
        min_price = info.data.get("min_price")
        if max_price is not None and min_price is not None and min_price > max_price:
            raise ValueError("maxPrice must not be below minPrice")
        return max_price


class StockBody(Body):
    stock: Money


class StockQuery(Query):
    stock: Annotated[int, Field(ge=0, le=1_000_000_000), QueryInt] | None = None


# ---- orders ---------------------------------------------------------------


class OrderLineIn(Body):
    product_id: Id
    quantity: Annotated[int, Field(ge=1, le=1_000)]


class OrderCreate(Body):
    user_id: Id
    order_lines: Annotated[list[OrderLineIn], Field(min_length=1, max_length=50)]

    @field_validator("order_lines")
    @classmethod
    def _distinct_products(cls, lines: list[OrderLineIn]) -> list[OrderLineIn]:
        seen: set[int] = set()
        for line in lines:
            if line.product_id in seen:
                raise ValueError(f"productId {line.product_id} appears more than once")
            seen.add(line.product_id)
        return lines


class OrderLineView(Out):
    product_id: int
    quantity: int
    unit_price: int


class PaymentView(Out):
    paid_amount: int
    discount_amount: int
    coupon_id: int | None
    paid_at: Timestamp


class OrderView(Out):
    id: int
    user_id: int
    status: OrderStatus
    version: int
    total_price: int
    order_lines: list[OrderLineView]
    payment: PaymentView | None = Field(description="null unless paid with points")
    expires_at: Timestamp | None = Field(
        description="when the unpaid order expires; null once COMPLETED or FAILED"
    )
    created_at: Timestamp
    updated_at: Timestamp


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)  # left out means "none", not a JSON null the client may send


class PaymentBody(Body):
    user_id: Id
    coupon_id: OptionalId = Field(default=None, json_schema_extra=_no_default)

    @field_validator("coupon_id", mode="before")
    @classmethod
    def _no_null(cls, coupon_id: Any) -> Any:
        if coupon_id is None:  # only a given null gets here (defaults are not validated)
            raise ValueError("must be an integer (leave couponId out to pay without a coupon)")
        return coupon_id


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
    user_id: Annotated[int, Field(ge=1, le=MAX_ID), QueryInt] | None = None


class UserCouponItem(Out):
    user_coupon_id: int
    coupon_id: int
    name: str
    discount_amount: int
    issued_at: Timestamp
    used_at: Timestamp | None = Field(description="null until the coupon pays an order")
    order_id: int | None = Field(description="the order it paid; null until then")


class UserCouponList(Out):
    items: list[UserCouponItem]


# ---- admin -----------------------------------------------------------------


class PartitionStatus(Out):
    queue: str
    kind: Literal["user", "product", "coupon"]
    pending: int
    oldest_pending_age_ms: int | None
    last_drain_at: Timestamp | None


class PartitionList(Out):
    items: list[PartitionStatus]


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
