"""The bar to beat (ARCHITECTURE.md): the original design written straight.

A Flask handler takes the order inside the request: ``SELECT ... FOR UPDATE`` on
the products in ascending id order, guarded stock updates, the order and its
lines, commit, 200.  Same schema and database as the service; no queue.
"""

from __future__ import annotations

import os

from flask import Flask, jsonify, request
from sqlalchemy import bindparam, create_engine, text
from sqlalchemy.dialects.postgresql import ARRAY, BIGINT

from shared.config import to_sqlalchemy_url

engine = create_engine(to_sqlalchemy_url(os.environ["BASELINE_DATABASE_URL"]), pool_size=8)
app = Flask(__name__)

LOCK = text(
    "SELECT id, price, stock FROM products WHERE id = ANY(:ids) ORDER BY id FOR UPDATE"
).bindparams(bindparam("ids", type_=ARRAY(BIGINT)))
TAKE = text("UPDATE products SET stock = stock - :q WHERE id = :id AND stock >= :q")
ORDER = text(
    "INSERT INTO orders (user_id, status, total_price) VALUES (:u, 'READY', :t) RETURNING id"
)
LINE = text(
    "INSERT INTO order_lines (order_id, product_id, quantity, unit_price)"
    " VALUES (:o, :p, :q, :price)"
)


@app.post("/v1/orders")
def post_order():  # type: ignore[no-untyped-def]
    body = request.get_json()
    lines = sorted(body["orderLines"], key=lambda line: line["productId"])
    with engine.begin() as conn:
        found = {
            row.id: row for row in conn.execute(LOCK, {"ids": [ln["productId"] for ln in lines]})
        }
        if len(found) != len(lines):
            return jsonify({"error": "PRODUCT_NOT_FOUND"}), 409
        if any(found[ln["productId"]].stock < ln["quantity"] for ln in lines):
            return jsonify({"error": "INSUFFICIENT_STOCK"}), 409
        for ln in lines:
            conn.execute(TAKE, {"q": ln["quantity"], "id": ln["productId"]})
        total = sum(found[ln["productId"]].price * ln["quantity"] for ln in lines)
        order_id = conn.execute(ORDER, {"u": body["userId"], "t": total}).scalar_one()
        for ln in lines:
            conn.execute(
                LINE,
                {
                    "o": order_id,
                    "p": ln["productId"],
                    "q": ln["quantity"],
                    "price": found[ln["productId"]].price,
                },
            )
    return jsonify({"orderId": order_id, "status": "READY"}), 200
