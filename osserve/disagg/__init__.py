"""Disaggregated serving: a frontend (OpenAI API + Harmony + routing) in front of prefill and decode
workers, with KV transfer between them and discovery through leases (etcd, or the frontend's registry).

frontend.py (`osserve frontend`), remote_engine.py (AsyncEngine's interface over workers, fail-over),
client.py (the frontend's view of each worker), router.py, worker.py (`osserve worker`), kv_transfer.py,
discovery.py, protocol.py (wire messages), launcher.py (`osserve serve --config` for several processes).
The engine-side half of the KV handoff is osserve/engine/handoff.py. docs/DEPLOY.md has the usage.
"""
