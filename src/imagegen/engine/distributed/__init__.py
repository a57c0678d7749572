"""Distributed mode (SD_REDIS_URL): API replicas and GPU workers sharing Redis (docs/scale-out.md).

Imported only when SD_REDIS_URL is set: the embedded default never loads the `redis` package.
  keys.py        key and channel names, routes, queue ranks
  connection.py  the Redis client (timeouts, retries) and how its errors become 503s
  scripts.py     the Lua scripts: every multi-key change is one atomic script
  codec.py       a job <-> its Redis hash
  fleet.py       worker heartbeats, the fleet as a replica sees it, FleetBackend proxies
  upkeep.py      what every node does in the background: reclaim lapsed leases, prune the job index
  engine.py      RedisJobEngine: the Engine of an API replica
  worker.py      Worker: `imagegen worker`, leases jobs and runs them on its backends
"""
