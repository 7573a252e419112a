"""`python -m prouigan_platform.ray_node start ...` is `ray start ...` with the node address kept as given.

Ray 2.60 replaces a node address of 127.0.0.1 by the machine's network address
(``ray._private.services.resolve_ip_for_localhost``), so with ``--node-ip-address=127.0.0.1`` the GCS, the
raylet, every worker and the agents still listen on the network.  Kept at 127.0.0.1, Ray binds its servers to
loopback (checked socket by socket in tests/test_platform_stack.py); any other address, 127.0.0.2 included,
makes its servers listen on every interface.

The same rewrite happens in every client: ``ray.init(address="127.0.0.1:6379")`` would dial the network address,
where nothing listens.  ``keep_node_address()`` turns the rewrite off in this process; ``init_ray`` (every
`prouigan` command and pipeline, also as a Ray job) calls it.  Your own driver code calls it before ``ray.init``,
or connects through the Ray client (``ray.init("ray://127.0.0.1:10001")``), which does not rewrite.
"""

from __future__ import annotations

import sys


def keep_node_address() -> None:
    import ray._private.services as services  # the one function patched; everything else is Ray's own

    resolve = services.resolve_ip_for_localhost
    if getattr(resolve, "_keeps_loopback", False):
        return

    def keep(host: str) -> str:
        return host if host in ("127.0.0.1", "::1") else resolve(host)

    keep._keeps_loopback = True
    services.resolve_ip_for_localhost = keep


def main() -> int:
    keep_node_address()
    from ray.scripts.scripts import main as ray_main  # Ray's CLI, after the patch

    return ray_main()


if __name__ == "__main__":
    sys.exit(main())
