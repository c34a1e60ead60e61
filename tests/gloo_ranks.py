"""Real multi-process gloo groups on 127.0.0.1 for tests: ``spawn(fn, world_size, *args)`` runs
``fn(rank, world_size, *args)`` in fresh processes; an assertion failing in any rank fails the test with its
traceback."""

from __future__ import annotations

import datetime
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from facescale.parallel.dist import free_loopback_port


def _entry(rank: int, world_size: int, port: int, fn, args) -> None:
    torch.set_num_threads(1)
    # DeepSpeed calls gloo collectives torch marks as deprecated, once per bucket per step: keep the log readable.
    warnings.filterwarnings("ignore", category=FutureWarning)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    fn(rank, world_size, *args)
    dist.barrier()  # rank 0 hosts the TCP store: nobody leaves before everyone is done with it
    dist.destroy_process_group()
    # The rank's work is done and checked (a failure above raised, and spawn reports it). Leave without interpreter
    # finalization: in a CI run, a rank once aborted there ("terminate called without an active exception",
    # SIGABRT) after a clean destroy -- gloo/c10d threads torn down during finalization, cf. pytorch/pytorch#179291.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, world_size: int, *args) -> None:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks and waits for all of them."""
    os.environ.setdefault("PYTHONPATH", os.pathsep.join(p for p in sys.path if p))
    mp.spawn(_entry, args=(world_size, free_loopback_port(), fn, args), nprocs=world_size, join=True)
