"""Multi-process training with torch.distributed DistributedDataParallel.

`fastlenet train --nproc N` spawns N processes on this machine (torch.multiprocessing, "spawn"
start method), joined through a TCP rendezvous on 127.0.0.1; under torchrun (which sets RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT) the same code joins the job torchrun describes, on one
machine or many:  torchrun --nnodes 2 --nproc-per-node 4 ... -m fastlenet train.

gloo on CPU, NCCL on CUDA (one GPU per local rank). Every rank holds the whole dataset and
draws the same seeded permutation; each global batch of --batch-size images is split into
world_size contiguous parts, one per rank, and DDP's gradient averaging makes a step equal to
a single-process step on the whole global batch (see train._Runner.step for the loss scaling).
Each rank gets threads // world_size intra-op threads so the processes share the cores.
"""

import dataclasses
import os
import socket
import sys

import torch
import torch.distributed
import torch.multiprocessing as mp

from fastlenet import checkpoint, data, models, train

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun() -> bool:
    return all(v in os.environ for v in TORCHRUN_VARS)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(config) -> str:
    return "nccl" if train.resolve_device(config).type == "cuda" else "gloo"


def _setup_device(config, local_rank):
    if train.resolve_device(config).type == "cuda":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())


def exit_without_teardown(code: int = 0):
    """Ends a process that used gloo and finished without the interpreter's teardown: in torch
    2.14 such a process (DDP, its barrier, destroy_process_group) aborts at exit at random with
    "terminate called without an active exception" (C++ static destruction, no Python frame).
    Measured with 2 spawned processes doing only DDP steps on a Linear, a barrier and
    destroy_process_group (no fastlenet code): 9 of 40 runs aborted; 0 of 40 ending with
    os._exit. The same under torchrun: `fastlenet train` on 2 ranks aborted in 2 of 40 runs.
    The caller must have handed back everything first (a spawned worker's metrics go through a
    SimpleQueue, written synchronously; checkpoints, metrics JSON and event files are closed
    when train returns); stdout and stderr are flushed here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _worker(rank, world_size, port, config, dataset, explicit, results):
    torch.distributed.init_process_group(
        _backend(config),
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
    )
    try:
        _setup_device(config, rank)
        metrics = train.train(
            config, dataset, dist=train.DistContext(rank, world_size), explicit=explicit
        )
        if rank == 0:
            results.put(metrics)
    finally:
        torch.distributed.destroy_process_group()
    exit_without_teardown(0)


def _per_rank(config, world_size):
    threads = config.threads or train.default_threads()
    return dataclasses.replace(config, threads=max(1, threads // world_size))


def run(config, dataset=None, explicit=()) -> dict:
    """Trains as `config` says: in this process, under torchrun, or in config.nproc spawned
    processes. Returns rank 0's metrics (other torchrun ranks return theirs)."""
    config.validate()
    if under_torchrun():
        world_size = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ["RANK"])
        if config.nproc not in (1, world_size):
            raise ValueError(
                f"--nproc {config.nproc} under torchrun, which started {world_size} processes: "
                "let torchrun choose (drop --nproc)"
            )
        config = _per_rank(config, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
        torch.distributed.init_process_group(_backend(config), init_method="env://")
        try:
            _setup_device(config, int(os.environ.get("LOCAL_RANK", rank)))
            dist = train.DistContext(rank, world_size)
            return train.train(config, dataset, dist=dist, explicit=explicit)
        finally:
            torch.distributed.destroy_process_group()
    if config.nproc == 1:
        return train.train(config, dataset, explicit=explicit)

    world_size = config.nproc
    if train.resolve_device(config).type == "cuda" and torch.cuda.device_count() < world_size:
        raise ValueError(
            f"--nproc {world_size} on CUDA needs one GPU per process; "
            f"{torch.cuda.device_count()} visible"
        )
    # A bad checkpoint or a missing dataset fails here, before any process starts.
    resolved, _ = checkpoint.prepare_resume(config, explicit)
    if dataset is None:
        image_size = models.input_size(resolved.model)[1:]
        dataset = data.load(resolved.dataset, resolved.data_dir, pad_to=image_size)
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.spawn(
        _worker,
        args=(world_size, _free_port(), _per_rank(config, world_size), dataset, explicit, results),
        nprocs=world_size,
        join=True,
    )
    return results.get()
