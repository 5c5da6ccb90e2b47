"""The host's endpoints: each server a provider speaks to, numbered once for every process.

A provider may speak to several servers of the same models (OLLAMA_BASE_URL
naming one Ollama per GPU): each is an endpoint, with its own reachability,
breakers (keyed ``<endpoint>:<model>``), model slots and load-board rows. The
endpoint table in shared memory (``ProviderTable``) gives each an index that
every process agrees on: a slot names the endpoint of its call by it, the load
board keeps a block of rows under it. Rows are added, never removed: the
supervisor registers the Ollama endpoints before it forks, a worker any other
provider's at boot. A host with one server per provider has one row each,
named after the provider, as before endpoints existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from llm_worker.host.layout import ENDPOINT_NAME, MAX_PROVIDERS, URL_BYTES, ProviderRow, ProviderTable

if TYPE_CHECKING:
    from llm_worker.host.shm import ShmLock


@dataclass(frozen=True)
class Endpoint:
    """One row of the table, as readers show it."""

    index: int
    name: str  # "ollama", or "ollama@2" among several
    provider: str  # "ollama"
    url: str
    shared: bool  # one of several servers of its provider: metrics then carry an ``endpoint`` label

    @property
    def label(self) -> str | None:
        """The value of the metrics' ``endpoint`` label: its URL among several, None alone (no label, as before)."""
        return (self.url or self.name) if self.shared else None


class EndpointTable:
    """The endpoint table, as one process uses it (lookups are cached: rows never move)."""

    def __init__(self, table: ProviderTable, lock: ShmLock) -> None:
        self.table = table
        self.lock = lock
        self._index: dict[str, int] = {}

    def find(self, name: str) -> int:
        """The endpoint's index, or -1 when it has no row."""
        index = self._index.get(name)
        if index is not None:
            return index
        raw = name.encode()[: ENDPOINT_NAME - 1]
        for i, row in enumerate(self.table.rows[: self.table.count]):
            if row.name == raw:
                self._index[name] = i
                return i
        return -1

    def register(self, name: str, provider: str = "", url: str = "") -> int:
        """The endpoint's index, its row added when new; -1 when the table is full (MAX_PROVIDERS rows)."""
        index = self.find(name)
        if index < 0:
            with self.lock.held():
                raw = name.encode()[: ENDPOINT_NAME - 1]
                found = [i for i, row in enumerate(self.table.rows[: self.table.count]) if row.name == raw]
                if found:
                    index = found[0]
                elif self.table.count < MAX_PROVIDERS:
                    index = self.table.count
                    self.table.rows[index].name = raw
                    self.table.count = index + 1
                else:
                    return -1
            self._index[name] = index
        row = self.table.rows[index]
        if provider and not row.provider:  # a row made by name alone (a down mark) learns what it is
            row.provider = provider.encode()[: ENDPOINT_NAME - 1]
        if url and not row.url:
            row.url = url.encode()[: URL_BYTES - 1]
        return index

    def row(self, index: int) -> ProviderRow:
        return self.table.rows[index]

    def record_health(self, index: int, ok: bool, version: str | None, error: str | None, checked: float) -> None:
        """The sampler's last health probe of an endpoint (its only writer), for /status and /metrics."""
        row = self.table.rows[index]
        row.healthy = int(ok)
        row.version = (version or "").encode()[:63]
        row.health_error = (error or "").encode()[:255]
        row.checked = checked

    def all(self) -> list[Endpoint]:
        """Every endpoint, in index order."""
        rows = list(self.table.rows[: min(self.table.count, MAX_PROVIDERS)])
        providers = [(row.provider or row.name).decode(errors="replace") for row in rows]
        return [
            Endpoint(
                index=i,
                name=row.name.decode(errors="replace"),
                provider=providers[i],
                url=row.url.decode(errors="replace"),
                shared=providers.count(providers[i]) > 1,
            )
            for i, row in enumerate(rows)
        ]
