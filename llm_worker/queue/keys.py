"""Every Redis key name, the one place each is spelled (docs/protocol.md, "Keys").

The Lua scripts never build a key: they are handed full names, or, where a key
belongs to a job whose id only the script reads (recover.lua), its family's
prefix, which each method gives when called with "".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """Every Redis key name, built from the configurable prefix (REDIS_KEY_PREFIX).

    A method called with "" gives the prefix of every key of its family: what
    a script adds a job's id to, and, with "*" after it, a SCAN pattern.
    """

    prefix: str
    dead_letter: str

    @property
    def delayed(self) -> str:
        return self.prefix + "delayed"

    @property
    def dead_letters_trimmed(self) -> str:
        """How many dead letters QUEUE_REMOVE_ON_FAIL has trimmed, all hosts together (a counter)."""
        return self.prefix + "dead-letters-trimmed"

    @property
    def events(self) -> str:
        return self.prefix + "events"

    @property
    def registry(self) -> str:
        return self.prefix + "workers"

    def processing(self, worker_id: str) -> str:
        return f"{self.prefix}processing:{worker_id}"

    def heartbeat(self, worker_id: str) -> str:
        return f"{self.prefix}worker:{worker_id}"

    def result(self, job_id: str) -> str:
        return f"{self.prefix}result:{job_id}"

    def done(self, job_id: str) -> str:
        return f"{self.prefix}done:{job_id}"

    def stream(self, job_id: str) -> str:
        return f"{self.prefix}stream:{job_id}"

    def crashes(self, job_id: str) -> str:
        return f"{self.prefix}crashes:{job_id}"

    def stats(self, queue: str) -> str:
        """Completed and failed counts of a queue, across hosts (for /admin/queue/stats)."""
        return f"{self.prefix}stats:{queue}"

    # ---- model affinity (parking.py, models/fleet.py) ----

    def parked_index(self, queue: str) -> str:
        """A queue's parked models: a sorted set of model labels, scored by when each one's oldest job was parked."""
        return f"{self.prefix}parked:{queue}"

    def parked(self, queue: str, model: str) -> str:
        """A queue's jobs parked for one model (a list). '#' is in neither a queue's nor a model's name."""
        return f"{self.prefix}parked:{queue}#{model}"

    def claim(self, model: str) -> str:
        """Which host is about to load a model that no host held (a string that expires)."""
        return f"{self.prefix}claim:{model}"

    @property
    def fleet(self) -> str:
        """The hosts that publish what they hold: a set of WORKER_IDs (models/fleet.py)."""
        return self.prefix + "fleet"

    def holdings(self, host: str) -> str:
        """What one host holds now: its published holdings, expiring unless published again."""
        return f"{self.prefix}fleet:{host}"

    def cache(self, digest: str) -> str:
        """A response cache entry, named by the digest of its request (cache.py)."""
        return f"{self.prefix}cache:{digest}"
