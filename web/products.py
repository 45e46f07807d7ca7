"""Products: created and read here; stock changes are jobs on the product's partition."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

from flask import Blueprint, Response, current_app, jsonify, request

from shared.cache import ProductCache
from shared.domain.products import (
    ProductQuery,
    ProductSort,
    create_product,
    get_product,
    list_products,
    product_document,
)
from shared.domain.sales import top_sellers
from shared.jobs import JobKind
from shared.top_sellers_cache import MAX_TOP, TopSellersCache
from web.api import operation, query_or_body, settings
from web.hot_reads import CACHE_MISSED
from web.publish import accept_job
from web.render import render, top_sellers_ranking
from web.schemas import (
    JobAccepted,
    Page,
    ProductCreate,
    ProductListQuery,
    ProductView,
    StockBody,
    StockQuery,
    TopSellersQuery,
    TopSellersView,
)
from web.session import LISTINGS_MAX_LAG, db_session, lagging_read, primary_read_session

bp = Blueprint("products", __name__, url_prefix="/v1/products")


def _cache() -> ProductCache:
    cache: ProductCache = current_app.extensions["product_cache"]
    return cache


@operation(
    bp,
    "",
    "POST",
    summary="Create a product (admin)",
    body=ProductCreate,
    responses={201: ProductView},
    headers={201: {"Location": "the new resource"}},
    admin=True,
)
def post_product(body: ProductCreate) -> Response:
    session = db_session()
    product = create_product(session, name=body.name, price=body.price, stock=body.stock)
    session.commit()
    document = product_document(product)
    _cache().refresh_product(document, product.version)
    _cache().invalidate_listings()
    response = jsonify(document)
    response.status_code = 201
    response.headers["Location"] = f"/v1/products/{product.id}"
    return response


@operation(
    bp,
    "/top",
    "GET",
    summary="Best sellers by units in the orders of the last `days` x 24 hours not FAILED"
    " (cached: generatedAt is when it was computed, at most 60 s ago)",
    query=TopSellersQuery,
    responses={200: TopSellersView},
)
def get_top_products(query: TopSellersQuery) -> Response:
    cache: TopSellersCache = current_app.extensions["top_sellers_cache"]
    cached = cache.get(query.days)
    if cached is not None:
        ranking = TopSellersView.model_validate(cached)
    else:
        # A replica may compute it if its data plus the cache's lifetime stay within
        # API.md's 60 s; generatedAt is then as old as the data it was computed from.
        top, behind = lagging_read(
            lambda s: top_sellers(s, days=query.days, limit=MAX_TOP),
            max_lag=max(0.0, 60.0 - settings().top_sellers_cache_seconds),
        )
        if behind:
            top = dataclasses.replace(
                top, generated_at=top.generated_at - dt.timedelta(seconds=behind)
            )
        ranking = top_sellers_ranking(top)
        cache.put(query.days, ranking.model_dump(mode="json", by_alias=True))
    # ``limit`` takes a prefix of the top MAX_TOP computed (and cached) per ``days``.
    return render(ranking.model_copy(update={"items": ranking.items[: query.limit]}))


@operation(
    bp,
    "/<id:product_id>",
    "GET",
    summary="A product (through the read cache)",
    responses={200: ProductView},
)
def get_product_by_id(product_id: int) -> Response:
    # Usually answered before Flask by web.hot_reads; here when that did not (a trailing
    # slash, a body...), with the same bytes, or when it asked and missed.
    if not request.environ.get(CACHE_MISSED):
        cached = _cache().get_product_json(product_id)
        if cached is not None:
            return Response(cached + b"\n", mimetype="application/json")
    # A miss reads the primary: the entry it fills must be the committed product (a
    # replica could put an older version back after its writer's refresh was lost).
    product = get_product(primary_read_session(), product_id)
    document = product_document(product)
    _cache().put_product(document, product.version)
    return jsonify(document)


@operation(
    bp,
    "",
    "GET",
    summary="List products: filter, sort and page",
    query=ProductListQuery,
    responses={200: Page[ProductView]},
)
def get_products(query: ProductListQuery) -> Response:
    cache = _cache()
    generation = cache.listing_generation()
    key = json.dumps(query.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    if generation is not None:
        cached = cache.get_listing(generation, key)
        if cached is not None:
            return jsonify(cached)
    product_query = ProductQuery(
        name=query.name or None,
        min_price=query.min_price,
        max_price=query.max_price,
        in_stock=query.in_stock,
        sort=ProductSort(query.sort),
        descending=query.order == "desc",
        page=query.page,
        size=query.size,
    )
    (rows, total), behind = lagging_read(
        lambda s: list_products(s, product_query), max_lag=LISTINGS_MAX_LAG
    )
    body = {
        "items": [p.document() for p in rows],
        "page": query.page,
        "size": query.size,
        "total": total,
    }
    if generation is not None:
        # A page read from a replica is kept only while its data is within the 1 s that
        # listings may lag; one from the primary until the next change (generation).
        ttl = LISTINGS_MAX_LAG - behind if behind else None
        cache.put_listing(generation, key, body, ttl_seconds=ttl)
    return jsonify(body)


@operation(
    bp,
    "/<id:product_id>/stock",
    "PUT",
    summary="Set a product's stock (admin; job STOCK_SET on the product's partition)",
    query=StockQuery,
    body=StockBody,
    body_optional=True,
    responses={202: JobAccepted},
    admin=True,
    job=True,
)
def put_stock(product_id: int, query: StockQuery, body: StockBody | None) -> Response:
    stock = query_or_body("stock", query.stock, body.stock if body else None)
    return accept_job(JobKind.STOCK_SET, {"productId": product_id, "stock": stock})
