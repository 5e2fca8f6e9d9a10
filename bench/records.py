"""Usage reports and admission with a million prompt records: `python -m bench.records`.

Needs PostgreSQL at 127.0.0.1:5432 (user postgres). In a fresh database the broker's own
CLI migrates and seeds a tenant, a user with a key and a token; 99 more users are added,
then N prompt records (default 1,000,000) spread over the last 12 months, generated in
the database (`generate_series`). The broker (1 worker) then serves, and this measures:

- the tenant's usage report grouped by user for the current month
  (`GET /admin/tenants/{id}/usage?group_by=user`), median of 10 after one warm-up;
- `POST /prompt` with a monthly tenant budget (so each admission reserves credits),
  sequential, median and p95 of 100 — once before the records are generated, once after:
  admission must not grow with the number of records.

Goal (issue #7): the report ≤ 200 ms with 1,000,000 records.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from bench import broker
from bench.cli import say
from bench.processes import Server
from bench.workloads import docs_body

GENERATE = """
INSERT INTO prompts (id, tenant_id, user_id, upstream, status, api_nodes, body_bytes,
    estimated_min_mc, estimated_max_mc, unpriced_nodes, cost_breakdown, reserved_mc,
    reservations, over_soft_limit, reported_prices, cached_nodes, actual_mc, actual_source,
    created_at, updated_at)
SELECT gen_random_uuid(), $1,
    (ARRAY(SELECT id FROM users WHERE tenant_id = $1 ORDER BY id))[1 + n % 100],
    'http://127.0.0.1:8188', 'success', '["FluxProUltraImageNode"]', 628,
    12660, 12660, '[]', '[]', 0, '[]', false, '{}', '[]', 12660, 'estimate',
    now() - (n % 365) * interval '1 day' - (n % 86400) * interval '1 second',
    now() - (n % 365) * interval '1 day'
FROM generate_series($2::int, $3::int) AS n
"""
BATCH = 100_000


async def generate(database_url: str, tenant_id: str, count: int) -> None:
    import asyncpg

    connection = await asyncpg.connect(database_url.replace("+asyncpg", ""))
    try:
        for user in range(99):
            await connection.execute(
                "INSERT INTO users (id, tenant_id, external_id, created_at) "
                "VALUES (gen_random_uuid(), $1, $2, now())",
                uuid.UUID(tenant_id), f"bench-user-{user}",
            )  # fmt: skip
        tenant = uuid.UUID(tenant_id)
        for first in range(1, count + 1, BATCH):
            started = time.perf_counter()
            last = min(first + BATCH - 1, count)
            await connection.execute(GENERATE, tenant, first, last)
            say(f"   records {last:,}/{count:,} ({time.perf_counter() - started:.1f} s)")
        await connection.execute("ANALYZE prompts")
    finally:
        await connection.close()


def timed(call: httpx.Client, method: str, url: str, **kwargs: object) -> float:
    started = time.perf_counter()
    response = call.request(method, url, **kwargs)  # type: ignore[arg-type]
    response.raise_for_status()
    return (time.perf_counter() - started) * 1000


def admissions(client: httpx.Client, auth: dict[str, str], count: int = 100) -> list[float]:
    body = docs_body().content
    return [timed(client, "POST", "/prompt", content=body, headers=auth) for _ in range(count)]


def summary(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[int(len(ordered) * 0.95) - 1]
    return f"median {statistics.median(ordered):.1f} ms, p95 {p95:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=1_000_000)
    args = parser.parse_args()
    if not broker.postgres_answers():
        raise SystemExit("PostgreSQL is not answering at 127.0.0.1:5432")
    admin_token = "bench-admin-" + secrets.token_urlsafe(16)
    with (
        tempfile.TemporaryDirectory(prefix="comfy-broker-bench-records-") as tmp,
        broker.postgres_database("records") as database_url,
        broker.staged(
            Path(tmp), database_url, extra_env={"BROKER_ADMIN_TOKEN": admin_token}
        ) as stage,
    ):
        measure(stage.broker, database_url, stage.token, admin_token, args.records)


def measure(served: Server, database_url: str, token: str, admin_token: str, records: int) -> None:
    auth = {"Authorization": f"Bearer {token}"}
    operator = {"Authorization": f"Bearer {admin_token}"}
    with httpx.Client(base_url=served.url, timeout=120) as client:
        [tenant] = client.get("/admin/tenants", headers=operator).json()["items"]
        budget = {"period": "month", "limit_credits": "100000000"}
        client.put(f"/admin/tenants/{tenant['id']}/budget", json=budget, headers=operator)
        admissions(client, auth, 10)  # warm-up
        empty = admissions(client, auth)
        say(f"generating {records:,} prompt records in PostgreSQL")
        started = time.perf_counter()
        asyncio.run(generate(database_url, tenant["id"], records))
        say(f"   done in {time.perf_counter() - started:.0f} s")
        report = f"/admin/tenants/{tenant['id']}/usage?group_by=user"
        timed(client, "GET", report, headers=operator)  # warm-up
        reports = [timed(client, "GET", report, headers=operator) for _ in range(10)]
        full = admissions(client, auth)
        rows = len(client.get(report, headers=operator).json()["rows"])
    say(f"\n| measurement | with {records:,} records |")
    say("| --- | --- |")
    say(f"| usage report, this month by user ({rows} users) | {summary(reports)} |")
    say(f"| POST /prompt with a monthly budget, empty table | {summary(empty)} |")
    say(f"| POST /prompt with a monthly budget, after | {summary(full)} |")
    verdict = "PASS" if statistics.median(reports) <= 200 else "FAIL"
    say(f"goal: report ≤ 200 ms: {verdict}")


if __name__ == "__main__":
    main()
