"""Endpoint sources: where pools learn their endpoints.

A source is an async stream of whole snapshots, ``{pool name: frozenset[Endpoint]}``. The
consumer applies each one as the complete truth (level-triggered), so a source may repeat
itself or coalesce changes without harm. The static source emits the configured endpoints
once; a watch-based source emits on every real change.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from balancer.config import PoolSettings
from balancer.endpoints import Endpoint, static_endpoint

Snapshot = dict[str, frozenset[Endpoint]]


class EndpointSource(Protocol):
    def snapshots(self) -> AsyncIterator[Snapshot]:
        """Yield whole snapshots for as long as the source runs."""
        ...


class StaticDiscovery:
    """The endpoints listed in the configuration, emitted once."""

    def __init__(self, pools: Sequence[PoolSettings]) -> None:
        self._snapshot: Snapshot = {
            p.name: frozenset(static_endpoint(url) for url in p.endpoints) for p in pools
        }

    def snapshot(self) -> Snapshot:
        return self._snapshot

    async def snapshots(self) -> AsyncIterator[Snapshot]:
        yield self._snapshot
        await asyncio.Event().wait()


class QueueDiscovery:
    """Snapshots pushed by hand: for embedding balancer and for tests that change endpoints."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Snapshot] = asyncio.Queue()

    def push(self, snapshot: Snapshot) -> None:
        self._queue.put_nowait(snapshot)

    async def snapshots(self) -> AsyncIterator[Snapshot]:
        while True:
            yield await self._queue.get()
