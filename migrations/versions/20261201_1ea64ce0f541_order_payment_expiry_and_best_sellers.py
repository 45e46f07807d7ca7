"""order payment, expiry and best sellers

Orders gain their payment (points paid, discount, coupon, time) and when an unpaid
order expires; a user's coupon remembers the order it paid; a point history row of
type PAYMENT names its order; ``product_sales`` holds units per product per UTC hour.

Additive only, so the previous release keeps working against it: new columns are
nullable and every new CHECK holds for the rows that release writes.  Unfinished
orders get ``expires_at`` from the default timeout (900 s), and ``product_sales``
is filled from the orders that are not FAILED, so the ranking and the expiry cover
orders placed before this revision.

Revision ID: 1ea64ce0f541
Revises: bd18018e783f
Create Date: 2026-12-01 22:00:03.569248

"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = "1ea64ce0f541"
down_revision: Union[str, Sequence[str], None] = "bd18018e783f"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "product_sales",
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("product_id", sa.BigInteger(), nullable=False),
        sa.Column("units", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("units >= 0", name=op.f("ck_product_sales_units_non_negative")),
        sa.PrimaryKeyConstraint("hour", "product_id", name=op.f("pk_product_sales")),
    )
    op.execute(
        "INSERT INTO product_sales (hour, product_id, units)"
        " SELECT date_trunc('hour', o.created_at, 'UTC'), l.product_id, sum(l.quantity)"
        " FROM orders o JOIN order_lines l ON l.order_id = o.id"
        " WHERE o.status <> 'FAILED' GROUP BY 1, 2"
    )

    op.add_column("orders", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("orders", sa.Column("paid_amount", sa.BigInteger(), nullable=True))
    op.add_column("orders", sa.Column("discount_amount", sa.BigInteger(), nullable=True))
    op.add_column("orders", sa.Column("coupon_id", sa.BigInteger(), nullable=True))
    op.add_column("orders", sa.Column("paid_at", sa.DateTime(timezone=True), nullable=True))
    op.create_check_constraint(
        op.f("ck_orders_payment_adds_up"),
        "orders",
        "paid_at IS NULL OR (status = 'COMPLETED' AND paid_amount >= 0"
        " AND discount_amount >= 0 AND paid_amount + discount_amount = total_price)",
    )
    op.execute(
        "UPDATE orders SET expires_at = created_at + interval '900 seconds'"
        " WHERE status IN ('READY', 'PAYMENT_READY')"
    )
    op.create_index(
        "ix_orders_expires_at",
        "orders",
        ["expires_at"],
        unique=False,
        postgresql_where=sa.text("expires_at IS NOT NULL"),
    )

    op.add_column("point_histories", sa.Column("order_id", sa.BigInteger(), nullable=True))
    op.create_unique_constraint(
        op.f("uq_point_histories_order_id"), "point_histories", ["order_id"]
    )
    op.create_check_constraint(
        op.f("ck_point_histories_payment_has_order"),
        "point_histories",
        "(type = 'PAYMENT') = (order_id IS NOT NULL)",
    )

    op.add_column("user_coupons", sa.Column("used_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("user_coupons", sa.Column("order_id", sa.BigInteger(), nullable=True))
    op.create_unique_constraint(op.f("uq_user_coupons_order_id"), "user_coupons", ["order_id"])
    op.create_foreign_key(
        op.f("fk_user_coupons_order_id_orders"), "user_coupons", "orders", ["order_id"], ["id"]
    )
    op.create_check_constraint(
        op.f("ck_user_coupons_used_by_an_order"),
        "user_coupons",
        "(used_at IS NULL) = (order_id IS NULL)",
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_constraint(op.f("ck_user_coupons_used_by_an_order"), "user_coupons", type_="check")
    op.drop_constraint(op.f("fk_user_coupons_order_id_orders"), "user_coupons", type_="foreignkey")
    op.drop_constraint(op.f("uq_user_coupons_order_id"), "user_coupons", type_="unique")
    op.drop_column("user_coupons", "order_id")
    op.drop_column("user_coupons", "used_at")
    op.drop_constraint(
        op.f("ck_point_histories_payment_has_order"), "point_histories", type_="check"
    )
    op.drop_constraint(op.f("uq_point_histories_order_id"), "point_histories", type_="unique")
    op.drop_column("point_histories", "order_id")
    op.drop_index(
        "ix_orders_expires_at",
        table_name="orders",
        postgresql_where=sa.text("expires_at IS NOT NULL"),
    )
    op.drop_constraint(op.f("ck_orders_payment_adds_up"), "orders", type_="check")
    op.drop_column("orders", "paid_at")
    op.drop_column("orders", "coupon_id")
    op.drop_column("orders", "discount_amount")
    op.drop_column("orders", "paid_amount")
    op.drop_column("orders", "expires_at")
    op.drop_table("product_sales")
