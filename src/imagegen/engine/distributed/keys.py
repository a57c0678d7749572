"""Names of the keys and channels of one cluster in Redis, routes, and queue ranks.

Every key starts with `{prefix}:`. The braces make the prefix a Redis Cluster hash tag: all keys of a
cluster live in one slot, so the Lua scripts (which compute some key names from the prefix) stay
valid there too. Data model: docs/scale-out.md.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Consumer group of the runs stream: every worker (and reclaimer) is a consumer of it.
GROUP = "workers"
#: A priority's weight in a queue rank: rank = (10 - priority) x 2^47 + admission sequence, exact in a
#: double (< 2^53), so a sorted set orders by priority, then first come.
PRIORITY_WEIGHT = 2**47
PRIORITY_MAX = 10


def route_of(backend: str, model: str) -> str:
    """The unit of routing: a worker reads the queues of the routes it serves. Backend ids hold no ':'."""
    return f"{backend}:{model}"


def split_route(route: str) -> tuple[str, str]:
    backend, _, model = route.partition(":")
    return backend, model


def rank_of(priority: int, seq: int) -> int:
    return (PRIORITY_MAX - priority) * PRIORITY_WEIGHT + seq


@dataclass(frozen=True)
class Keys:
    prefix: str

    @classmethod
    def for_prefix(cls, name: str) -> Keys:
        return cls("{" + name + "}")

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def queue(self, route: str) -> str:
        return f"{self.prefix}:queue:{route}"

    @property
    def jobs(self) -> str:
        return f"{self.prefix}:jobs"

    @property
    def queued(self) -> str:
        return f"{self.prefix}:queued"

    @property
    def routes(self) -> str:
        return f"{self.prefix}:routes"

    @property
    def running(self) -> str:
        return f"{self.prefix}:running"

    @property
    def runs(self) -> str:
        return f"{self.prefix}:runs"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def workers_seen(self) -> str:
        return f"{self.prefix}:workers:seen"

    @property
    def outbox(self) -> str:
        return f"{self.prefix}:outbox"

    @property
    def stats(self) -> str:
        return f"{self.prefix}:stats"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"

    @property
    def control(self) -> str:
        return f"{self.prefix}:control"

    @property
    def wake(self) -> str:
        return f"{self.prefix}:wake"
