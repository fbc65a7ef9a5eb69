"""Lightning's DDP strategy with a separate timeout for collectives (``hardware.collective_timeout_s``).

torch applies ``init_process_group``'s one timeout both to the rendezvous (every rank connecting to the store,
which waits for the slowest rank to start: imports, a cluster's staggered node starts) and to every later
collective (a peer that died or hangs). A timeout short enough to catch a hung peer within minutes makes a slow
start fail. Here the rendezvous keeps torch's default (30 minutes) and the collectives get the configured timeout,
set on the process group once every rank has joined.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pytorch_lightning.strategies import DDPStrategy


class CollectiveTimeoutDDP(DDPStrategy):
    """``DDPStrategy`` whose collectives give up after ``collective_timeout`` (the rendezvous waits torch's default).
    With NCCL, torch's asynchronous error handling (on by default) turns the timeout into an error."""

    strategy_name = "ddp_collective_timeout"

    def __init__(self, collective_timeout: timedelta, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.collective_timeout = collective_timeout

    def setup_distributed(self) -> None:
        super().setup_distributed()
        from torch.distributed import distributed_c10d

        distributed_c10d._set_pg_timeout(self.collective_timeout)


def trainer_strategy(hardware: Any) -> Any:
    """Lightning's ``strategy``: ``hardware.strategy`` as named, or for ``ddp`` with ``hardware.collective_timeout_s``
    a DDP strategy whose collectives give up after that many seconds (a peer that died or hangs), while the
    rendezvous keeps torch's default (:class:`CollectiveTimeoutDDP`)."""
    strategy = str(hardware.get("strategy", "auto"))
    timeout = hardware.get("collective_timeout_s")
    if strategy != "ddp" or timeout is None:
        return strategy
    return CollectiveTimeoutDDP(collective_timeout=timedelta(seconds=float(timeout)))
