"""Error codes, spelled exactly as in API.md, and the business failures that carry them."""

from __future__ import annotations

import enum
from typing import TypeVar


class ErrorCode(enum.StrEnum):
    VALIDATION_ERROR = "VALIDATION_ERROR"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    FORBIDDEN = "FORBIDDEN"
    NOT_FOUND = "NOT_FOUND"
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE"
    ORDER_STATE_CONFLICT = "ORDER_STATE_CONFLICT"
    IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"
    RATE_LIMITED = "RATE_LIMITED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"
    # Business failures: they finish a job as FAILED, they are not HTTP errors.
    INSUFFICIENT_STOCK = "INSUFFICIENT_STOCK"
    INSUFFICIENT_POINTS = "INSUFFICIENT_POINTS"
    POINT_LIMIT_EXCEEDED = "POINT_LIMIT_EXCEEDED"
    COUPON_SOLD_OUT = "COUPON_SOLD_OUT"
    COUPON_ALREADY_ISSUED = "COUPON_ALREADY_ISSUED"
    PRODUCT_NOT_FOUND = "PRODUCT_NOT_FOUND"
    COUPON_NOT_FOUND = "COUPON_NOT_FOUND"
    ORDER_NOT_FOUND = "ORDER_NOT_FOUND"
    ORDER_NOT_OWNED = "ORDER_NOT_OWNED"
    ORDER_NOT_PAYABLE = "ORDER_NOT_PAYABLE"
    COUPON_NOT_OWNED = "COUPON_NOT_OWNED"
    COUPON_ALREADY_USED = "COUPON_ALREADY_USED"


class DomainError(Exception):
    """A rule said no.  Workers record it as a FAILED job; web maps it to an HTTP answer."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(DomainError):
    code = ErrorCode.NOT_FOUND


class InsufficientStock(DomainError):
    code = ErrorCode.INSUFFICIENT_STOCK


class InsufficientPoints(DomainError):
    code = ErrorCode.INSUFFICIENT_POINTS


class PointLimitExceeded(DomainError):
    code = ErrorCode.POINT_LIMIT_EXCEEDED


class CouponSoldOut(DomainError):
    code = ErrorCode.COUPON_SOLD_OUT


class CouponAlreadyIssued(DomainError):
    code = ErrorCode.COUPON_ALREADY_ISSUED


class ProductNotFound(DomainError):
    code = ErrorCode.PRODUCT_NOT_FOUND


class CouponNotFound(DomainError):
    code = ErrorCode.COUPON_NOT_FOUND


class OrderStateConflict(DomainError):
    code = ErrorCode.ORDER_STATE_CONFLICT


class OrderNotFound(DomainError):
    code = ErrorCode.ORDER_NOT_FOUND


class OrderNotOwned(DomainError):
    code = ErrorCode.ORDER_NOT_OWNED


class OrderNotPayable(DomainError):
    code = ErrorCode.ORDER_NOT_PAYABLE


class CouponNotOwned(DomainError):
    code = ErrorCode.COUPON_NOT_OWNED


class CouponAlreadyUsed(DomainError):
    code = ErrorCode.COUPON_ALREADY_USED


T = TypeVar("T")


def unwrap(outcome: T | DomainError) -> T:
    """The value of a one-item batch outcome, or raise its failure."""
    if isinstance(outcome, DomainError):
        raise outcome
    return outcome
