"""Torch's process group on the address Ray gave each worker, never on every interface.

Ray Train's own ``TorchConfig`` lets rank 0 start torch's TCPStore, which listens on the wildcard address
whatever MASTER_ADDR says, and gloo picks the interface its host name resolves to.  ``NodeAddressTorchConfig``
does the same set-up with two differences: rank 0 opens the store's listening socket itself, on its node's Ray
address (127.0.0.1 in the embedded stack, the node's IP on a cluster), and hands it to the store
(``master_listen_fd``); gloo and NCCL are told the interface that carries that address.  Everything else (the
backend choice, the torch environment variables, the shutdown) is Ray's.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import psutil
import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

_store_fd: int | None = None  # rank 0's listening socket, from _listen to _join (the same worker process)


def _node_address() -> str:
    return ray.util.get_node_ip_address()


def _listen() -> tuple[str, int]:
    """On rank 0: a listening socket on this node's Ray address; -> (address, port)."""
    global _store_fd
    addr = _node_address()
    sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((addr, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    _store_fd = sock.detach()  # the store owns it from here
    return addr, port


def interface_of(addr: str) -> str | None:
    """The network interface that carries ``addr`` (``lo`` for 127.0.0.1), or None."""
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == addr for a in addrs):
            return name
    return None


def _join(backend: str, world_rank: int, world: int, addr: str, port: int, timeout_s: float) -> None:
    iface = interface_of(_node_address())
    if iface:  # a user's own setting wins
        os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)
    if backend == "nccl":  # as Ray does: fail a collective that times out instead of hanging
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
    timeout = timedelta(seconds=timeout_s)
    if world_rank == 0:
        store = dist.TCPStore(addr, port, world, True, timeout, use_libuv=True, master_listen_fd=_store_fd)
    else:
        store = dist.TCPStore(addr, port, world, False, timeout)
    dist.init_process_group(backend, store=store, rank=world_rank, world_size=world, timeout=timeout)


class _NodeAddressBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        backend = backend_config.backend
        if backend is None:
            backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"
        addr, port = worker_group.execute_single(0, _listen)
        worker_group.execute(_set_torch_distributed_env_vars)
        n = len(worker_group)
        ray.get([worker_group.execute_single_async(i, _join, backend=backend, world_rank=i, world=n, addr=addr,
                                                   port=port, timeout_s=backend_config.timeout_s) for i in range(n)])


@dataclass
class NodeAddressTorchConfig(TorchConfig):
    @property
    def backend_cls(self):
        return _NodeAddressBackend
