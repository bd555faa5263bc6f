"""--nproc: DistributedDataParallel in 2 gloo processes on CPU equals one process on the same
global batches; torchrun runs the same command.

Tolerance: DDP computes each global batch's gradient as the average of two half-batch
gradients (each rank sums 16 per-sample terms, gloo adds the two sums) where one process sums
32 terms at once: the same terms in another order, so each step's gradient differs by float32
rounding (relative ~1e-7). Over the 7 SGD steps run here the parameters agree to 5e-8 at worst
(measured, fc3.bias); PARAM_TOL = 1e-5 leaves a wide margin and is far below the
difference a wrong split (a rank training on the other's samples, or gradients summed instead
of averaged) makes, which the test checks is above 1e-3.
"""

import os
import subprocess
import sys

import pytest
import torch
from conftest import rel_err, write_idx_files

from fastlenet import data, distributed, train

PARAM_TOL = 1e-5  # see the module docstring


def _config(tmp_path, name, **kw):
    base = dict(
        epochs=1,
        batch_size=32,
        threads=2,
        progress=False,
        device="cpu",
        lr=0.05,
        checkpoint=str(tmp_path / f"{name}.pt"),
    )
    base.update(kw)
    return train.TrainConfig(**base)


def _params(config):
    return torch.load(config.checkpoint, weights_only=True)["model"]


def test_two_gloo_processes_equal_one_process(tmp_path):
    # 200 images at batch 32: 6 full global batches and a final one of 8 (4 per rank).
    ds = data.synthetic(n_train=200, n_test=48, seed=5)
    single = _config(tmp_path, "single")
    m1 = train.train(single, dataset=ds, log=lambda s: None)
    ddp = _config(tmp_path, "ddp", nproc=2)
    m2 = distributed.run(ddp, dataset=ds)
    assert m2["nproc"] == 2 and m2["threads"] == 1  # the 2 threads shared out
    a, b = _params(single), _params(ddp)
    for name in a:
        assert rel_err(b[name], a[name]) < PARAM_TOL, name
    # The epoch's loss and test accuracy are reduced over both ranks.
    assert m2["epochs"][0]["train_loss"] == pytest.approx(m1["epochs"][0]["train_loss"], 1e-5)
    assert m2["test_accuracy"] == m1["test_accuracy"]
    # A difference the test must see: half the batch (what one rank alone would train on).
    half = _config(tmp_path, "half", batch_size=16)
    train.train(half, dataset=ds, log=lambda s: None)
    c = _params(half)
    assert max(rel_err(c[k], a[k]) for k in a) > 1e-3


def test_torchrun_runs_the_same_command(tmp_path):
    directory = write_idx_files(tmp_path / "idx", seed=6)
    args = [
        *("-m", "fastlenet", "train", "--data-dir", str(directory), "--epochs", "1"),
        *("--batch-size", "32", "--lr", "0.05", "--threads", "2", "--no-progress"),
        *("--device", "cpu"),
    ]
    single, ddp = tmp_path / "single.pt", tmp_path / "torchrun.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for cmd in (
        [sys.executable, *args, "--checkpoint", str(single)],
        [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
            *("--nproc-per-node", "2", *args, "--checkpoint", str(ddp)),
        ],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2 processes" in proc.stdout
    a = torch.load(single, weights_only=True)["model"]
    b = torch.load(ddp, weights_only=True)["model"]
    for name in a:
        assert rel_err(b[name], a[name]) < PARAM_TOL, name


def test_torchrun_rank_ends_with_its_exit_code_and_message(tmp_path):
    # Under torchrun `fastlenet train` ends through os._exit (distributed.exit_without_teardown):
    # the code and the buffered stderr must still come out. A refused --nproc fails before any
    # process group, so a one-rank torchrun environment is enough.
    env = {
        **os.environ,
        **dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511"),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastlenet",
            "train",
            "--nproc",
            "3",
            "--device",
            "cpu",
            "--checkpoint",
            str(tmp_path / "ck.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "fastlenet: error: --nproc 3 under torchrun" in proc.stderr
