"""The checks of ``make deploy-check`` on the compose stack that deploy/check.sh started.

Through web's published port (loopback) and ``podman`` only:

1. three partition workers answer a Celery ping, with three distinct node names;
2. point charges, orders and coupon issues go through web while one worker container's
   main process is SIGKILLed (as the kernel's OOM killer would: not a ``podman stop``);
3. the container is restarted by its restart policy, is healthy again, and every job
   finished exactly once: balances equal the charges (and as many history rows), stock
   fell by exactly the ordered units, the coupon issued exactly its quantity;
4. a product listing was served by a replica (its ``pg_stat_activity`` shows web's
   connection with the listing query), and both replicas are streaming standbys;
5. every line each process of the image wrote is a JSON object (LOG_FORMAT=json), and
   web's access lines carry the X-Request-Id it answered with;
6. web's /metrics and every worker's own metrics port answer.

Exits non-zero with the reason on the first failed check.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import requests

T = TypeVar("T")
ADMIN = {"Authorization": f"Bearer {os.environ['ADMIN_TOKEN']}"}
STOCK = 10_000
COUPON_QUANTITY = 40


class CheckFailed(Exception):
    pass


def say(text: str) -> None:
    print(f"  check: {text}", flush=True)


def check(condition: bool, what: str) -> None:
    if not condition:
        raise CheckFailed(what)


def poll(fn: Callable[[], T | None], timeout: float, what: str, interval: float = 0.5) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise CheckFailed(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


class Stack:
    def __init__(self, project: str, web: str) -> None:
        self.project = project
        self.web = web
        self.http = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=32)
        self.http.mount("http://", adapter)

    def podman(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(
            ["podman", *args], capture_output=True, text=True, check=False, timeout=120
        )
        if check and done.returncode != 0:
            raise CheckFailed(f"podman {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def containers(self, service: str) -> list[str]:
        out = self.podman(
            "ps",
            "-a",
            "--filter",
            f"label=io.podman.compose.project={self.project}",
            "--filter",
            f"label=io.podman.compose.service={service}",
            "--format",
            "{{.Names}}",
        )
        return sorted(out.split())

    def inspect(self, container: str, template: str) -> str:
        return self.podman("inspect", "-f", template, container).strip()

    def psql(self, container: str, sql: str) -> str:
        return self.podman(
            "exec", container, "psql", "-h", "127.0.0.1", "-U", "shop", "-d", "shop", "-tAc", sql
        ).strip()

    def post(self, path: str, body: dict[str, Any], **kwargs: Any) -> requests.Response:
        for _ in range(50):  # the per-address rate limit (all of this comes from one address)
            answer = self.http.post(self.web + path, json=body, timeout=30, **kwargs)
            if answer.status_code != 429:
                return answer
            time.sleep(float(answer.headers.get("Retry-After", "1")))
        raise CheckFailed(f"POST {path}: still rate-limited")

    def job(self, path: str, body: dict[str, Any]) -> str:
        answer = self.post(path, body)
        check(answer.status_code == 202, f"POST {path}: {answer.status_code} {answer.text}")
        job_id: str = answer.json()["jobId"]
        return job_id

    def get(self, path: str, **params: Any) -> Any:
        answer = self.http.get(self.web + path, params=params, timeout=40)
        check(answer.status_code == 200, f"GET {path}: {answer.status_code} {answer.text}")
        return answer.json()

    def finished(self, job_id: str, timeout: float = 240) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job: dict[str, Any] = self.get(f"/v1/jobs/{job_id}", wait=20)
            if job["status"] != "PENDING":
                return job
        raise CheckFailed(f"job {job_id} still PENDING after {timeout} s")

    def ping_nodes(self, via: str) -> list[str]:
        out = self.podman(
            "exec", via, "celery", "-A", "workers.app", "inspect", "ping", "--timeout", "5",
            check=False,
        )  # fmt: skip
        return sorted(set(re.findall(r"(partitions\d+@\S+?):", out)))


def check_nodes(stack: Stack) -> list[str]:
    workers = stack.containers("worker")
    check(len(workers) == 3, f"three worker containers, not {workers}")

    def three() -> list[str] | None:
        nodes = stack.ping_nodes(workers[0])
        return nodes if len(nodes) == 3 else None

    nodes = poll(three, 60, "three partition nodes answering a ping")
    hostnames = {stack.inspect(w, "{{.Config.Hostname}}") for w in workers}
    check({n.split("@")[1] for n in nodes} == hostnames, f"{nodes} are the containers' hostnames")
    say(f"3 workers, node names {', '.join(nodes)}")
    return workers


def send_traffic(stack: Stack, workers: list[str]) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    products = []
    for i in range(4):
        answer = stack.http.post(
            stack.web + "/v1/products",
            json={"name": f"check-{tag}-{i}", "price": 100, "stock": STOCK},
            headers=ADMIN,
            timeout=30,
        )
        check(answer.status_code == 201, f"product: {answer.status_code} {answer.text}")
        products.append(answer.json()["id"])
    answer = stack.http.post(
        stack.web + "/v1/coupons",
        json={"name": f"check-{tag}", "discountAmount": 10, "totalQuantity": COUPON_QUANTITY},
        headers=ADMIN,
        timeout=30,
    )
    check(answer.status_code == 201, f"coupon: {answer.status_code} {answer.text}")
    coupon = answer.json()["id"]
    base = random.randrange(10**9, 2 * 10**9)
    users = [base + i for i in range(30)]

    requests_: list[tuple[str, str, dict[str, Any]]] = []
    for user in users:
        requests_ += [("charge", "/v1/points/charge", {"userId": user, "amount": 7})] * 4
        product = random.choice(products)
        quantity = random.randint(1, 3)
        requests_.append(
            (
                f"order:{product}:{quantity}",
                "/v1/orders",
                {"userId": user, "orderLines": [{"productId": product, "quantity": quantity}]},
            )
        )
    # More users than coupons, and a few asking twice.
    for user in [*users, *[base + 100 + i for i in range(20)], *users[:5]]:
        requests_.append(("coupon", f"/v1/coupons/{coupon}/issue", {"userId": user}))
    random.shuffle(requests_)

    victim = random.choice(workers)
    before = {
        "restarts": stack.inspect(victim, "{{.RestartCount}}"),
        "started": stack.inspect(victim, "{{.State.StartedAt}}"),
    }
    half = len(requests_) // 2
    say(f"{len(requests_)} job requests; SIGKILL of {victim} after {half}")
    with ThreadPoolExecutor(8) as pool:
        first = list(pool.map(lambda r: (r[0], stack.job(r[1], r[2])), requests_[:half]))
        pid = int(stack.inspect(victim, "{{.State.Pid}}"))
        check(pid > 0, f"{victim} has a main process")
        os.kill(pid, signal.SIGKILL)
        second = list(pool.map(lambda r: (r[0], stack.job(r[1], r[2])), requests_[half:]))
    return {
        "jobs": first + second,
        "products": products,
        "coupon": coupon,
        "users": users,
        "victim": victim,
        "before": before,
    }


def check_exactly_once(stack: Stack, sent: dict[str, Any]) -> None:
    with ThreadPoolExecutor(16) as pool:
        jobs = list(pool.map(lambda kj: (kj[0], stack.finished(kj[1])), sent["jobs"]))
    outcomes = Counter(
        (what.split(":")[0], j["status"], (j["error"] or {}).get("code")) for what, j in jobs
    )
    say(f"every job finished: {dict(outcomes)}")
    for what, job in jobs:
        if what == "coupon":
            check(
                job["status"] == "SUCCEEDED"
                or job["error"]["code"] in ("COUPON_SOLD_OUT", "COUPON_ALREADY_ISSUED"),
                f"coupon job {job}",
            )
        else:
            check(job["status"] == "SUCCEEDED", f"{what} job {job}")
    for user in sent["users"]:
        balance = stack.get(f"/v1/points/{user}")["amount"]
        check(balance == 4 * 7, f"user {user}: balance {balance}, charged 4 x 7 once each")
        rows = stack.get(f"/v1/points/{user}/histories", size=50)["total"]
        check(rows == 4, f"user {user}: {rows} point history rows for 4 charges")
    ordered: Counter[int] = Counter()
    for what, _job in jobs:
        if what.startswith("order:"):
            _, product, quantity = what.split(":")
            ordered[int(product)] += int(quantity)
    for product in sent["products"]:
        stock = stack.get(f"/v1/products/{product}")["stock"]
        check(stock == STOCK - ordered[product], f"product {product}: stock {stock}")
    issued = sum(1 for what, j in jobs if what == "coupon" and j["status"] == "SUCCEEDED")
    coupon = stack.get(f"/v1/coupons/{sent['coupon']}")
    check(issued == COUPON_QUANTITY, f"{issued} coupon issues succeeded")
    check(coupon["issuedQuantity"] == COUPON_QUANTITY, f"coupon {coupon}")
    say("exactly once: balances, point histories, stock and the coupon count all match")


def check_restarted(stack: Stack, sent: dict[str, Any]) -> None:
    victim = sent["victim"]

    def restarted() -> bool | None:
        running = stack.inspect(victim, "{{.State.Running}}") == "true"
        started = stack.inspect(victim, "{{.State.StartedAt}}")
        return True if running and started != sent["before"]["started"] else None

    poll(restarted, 120, f"{victim} restarted")
    poll(
        lambda: (
            True
            if subprocess.run(["podman", "healthcheck", "run", victim], check=False).returncode == 0
            else None
        ),
        120,
        f"{victim} healthy again",
        interval=2,
    )
    restarts = stack.inspect(victim, "{{.RestartCount}}")
    say(
        f"{victim} restarted by its policy"
        f" (restart count {sent['before']['restarts']} -> {restarts}) and healthy"
    )
    check(len(stack.ping_nodes(victim)) == 3, "three nodes again")


def check_replica_reads(stack: Stack, sent: dict[str, Any]) -> None:
    replicas = stack.containers("postgres-replica") + stack.containers("postgres-replica-2")
    check(len(replicas) == 2, f"two replicas: {replicas}")
    for replica in replicas:
        check(stack.psql(replica, "select pg_is_in_recovery()") == "t", f"{replica} is a standby")
    sql = (
        "select count(*) from pg_stat_activity where application_name = 'shop-production'"
        " and query ilike '%from products%'"
    )

    # A page read from the primary stays in web's listing cache until the next product
    # change, so asking the same page again would only find the cache: each try asks a
    # page size not asked before (cycling through API.md's 1..100 within the 60 s), which
    # web must read from a replica or the primary.
    sizes = itertools.cycle(range(5, 101))

    def served() -> list[str] | None:
        listing = stack.get("/v1/products", name="check-", size=next(sizes))
        check(listing["total"] >= len(sent["products"]), f"listing {listing}")
        hits = [r for r in replicas if int(stack.psql(r, sql)) > 0]
        return hits or None

    hits = poll(served, 60, "a listing served by a replica")
    say(f"listing served by {', '.join(hits)} (pg_stat_activity there)")


def check_logs_and_metrics(stack: Stack) -> None:
    marker = f"check-{uuid.uuid4().hex[:12]}"
    answer = stack.http.get(stack.web + "/healthz", headers={"X-Request-Id": marker}, timeout=10)
    check(answer.headers.get("X-Request-Id") == marker, "X-Request-Id echoed")
    for service in ("web", "worker", "history", "beat", "migrate"):
        for container in stack.containers(service):
            done = subprocess.run(
                ["podman", "logs", container], capture_output=True, text=True, check=False
            )
            lines = [x for x in (done.stdout + done.stderr).splitlines() if x.strip()]
            for line in lines:
                try:
                    parsed = json.loads(line)
                except ValueError:
                    parsed = None
                check(
                    isinstance(parsed, dict), f"{container} wrote a line that is not JSON: {line!r}"
                )

    def access_line() -> bool | None:
        done = subprocess.run(
            ["podman", "logs", stack.containers("web")[0]],
            capture_output=True,
            text=True,
            check=False,
        )
        return True if f'"request_id": "{marker}"' in done.stdout + done.stderr else None

    poll(access_line, 20, "web's access line with the request id")
    say("every line of web, workers, history, beat and migrate is JSON; access line found")
    metrics = stack.http.get(stack.web + "/metrics", timeout=30)
    check(metrics.status_code == 200 and "shop_jobs_accepted_total" in metrics.text, "web /metrics")
    for worker in stack.containers("worker"):
        out = stack.podman(
            "exec", worker, "python", "-c",
            "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9100/metrics').read().decode())",
        )  # fmt: skip
        check("shop_drains_total" in out, f"{worker}: its own metrics on 9100")
    say("web /metrics and each worker's :9100 answer")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--project", required=True)
    parser.add_argument("--web", required=True)
    parser.add_argument("--flower", required=True)
    args = parser.parse_args()
    stack = Stack(args.project, args.web)
    try:
        workers = check_nodes(stack)
        sent = send_traffic(stack, workers)
        check_restarted(stack, sent)
        check_exactly_once(stack, sent)
        check_replica_reads(stack, sent)
        check_logs_and_metrics(stack)
        user, password = os.environ["FLOWER_BASIC_AUTH"].split(",")[0].split(":", 1)
        flower = requests.get(args.flower + "/api/workers", auth=(user, password), timeout=30)
        check(flower.status_code == 200, f"flower /api/workers: {flower.status_code}")
        check(
            requests.get(args.flower + "/api/workers", timeout=30).status_code == 401,
            "flower asks for its password",
        )
        say("flower answers behind its basic auth")
    except CheckFailed as failed:
        print(f"deploy-check FAILED: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
