"""Run a test function on real gloo processes: `spawn(fn, world, *args)` calls ``fn(rank, world, *args)`` on each
rank inside an initialised process group (``fn`` must be a module-level function, so the children can import it)."""

import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(rank: int, world: int, port: int, fn, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args) -> None:
    mp.spawn(_run, args=(world, free_port(), fn, args), nprocs=world, join=True)
