"""Control plane: the run-metadata store (etcd or in-process), runs, pause/resume, Kubernetes.

`store.py` holds the `MetadataStore` interface, `MemoryStore` and `store_from_config`; the etcd
implementation is `etcd_store.EtcdStore`, imported only when used (it loads gRPC).
"""
from megatron_rl.control.store import (
    RUNS_PREFIX, KeepAlive, Lease, LeaseExpired, MemoryStore, MetadataStore, StoreError, StoreUnavailable, Watch,
    WatchEvent, run_prefix, store_from_config,
)

__all__ = [
    "RUNS_PREFIX", "KeepAlive", "Lease", "LeaseExpired", "MemoryStore", "MetadataStore", "StoreError",
    "StoreUnavailable", "Watch", "WatchEvent", "run_prefix", "store_from_config",
]
