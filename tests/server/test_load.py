"""A bounded load test: 50 concurrent clients, no errors but the intended 429s."""

from __future__ import annotations

import asyncio
import collections

import httpx

from .conftest import KEYS, Server


def test_fifty_concurrent_clients_get_only_intended_answers(server: Server) -> None:
    async def main() -> collections.Counter[int]:
        statuses: collections.Counter[int] = collections.Counter()
        limits = httpx.Limits(max_connections=60, max_keepalive_connections=60)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30) as client:
            async def worker(n: int) -> None:
                rated = n % 10 == 0  # five clients share a key limited to 20/s with a burst of 5: meant to hit 429
                key = KEYS["rated"] if rated else KEYS["alice"]
                for i in range(60 if rated else 15):
                    response = await client.post("/v1/tasks?wait=true", json={"algorithm": "app/echo", "inputs": i},
                                                 headers={"Authorization": f"Bearer {key}"})
                    statuses[response.status_code] += 1
                    if response.status_code == 200:
                        assert response.json()["outputs"] == i

            await asyncio.gather(*(worker(n) for n in range(50)))
        return statuses

    statuses = asyncio.run(main())
    assert sum(statuses.values()) == 5 * 60 + 45 * 15
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[200] >= 45 * 15 and statuses[429] > 0
