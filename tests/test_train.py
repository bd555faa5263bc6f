"""fastlenet.train and the command line: learning, resumable and reproducible training, atomic
checkpoints, metrics, --compare-stock, eval of fastlenet and stock checkpoints, and clean errors.

Small synthetic datasets (fastlenet.data.synthetic) keep each run to a second or two.
"""

import io
import json
import os
import subprocess
import sys

import pytest
import torch

from fastlenet import FashionCNN, LeNet5, checkpoint, data, report, train
from fastlenet.__main__ import main

THREADS = 2  # the fixed thread count of the bitwise tests (the machine has 2 cores)


def _dataset(n_train=200, n_test=64, seed=0):
    # 200 is not a multiple of the batch size: every epoch ends with a partial batch.
    return data.synthetic(n_train=n_train, n_test=n_test, seed=seed)


def _config(**kw):
    # lr 0.05: the default (0.1) is tuned for MNIST at batch 128, not for these small
    # synthetic sets at batch 32
    base = dict(epochs=2, batch_size=32, lr=0.05, threads=THREADS, progress=False, device="cpu")
    base.update(kw)
    return train.TrainConfig(**base)


def _params(path):
    return torch.load(path, weights_only=True)["model"]


def _quiet(_line):
    pass


def _assert_bitwise_equal(a, b):
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_training_learns():
    ds = _dataset(n_train=1024, n_test=128)
    m = train.train(_config(epochs=4), dataset=ds, log=_quiet)
    assert m["epochs_done"] == 4
    assert m["epochs"][-1]["train_loss"] < 0.5 * m["epochs"][0]["train_loss"]
    assert m["test_accuracy"] > 0.9  # 10 well separated classes; chance is 0.1


def test_resume_is_bitwise_equal_to_straight_training(tmp_path):
    ds = _dataset()
    straight, split = tmp_path / "straight.pt", tmp_path / "split.pt"
    train.train(_config(checkpoint=str(straight)), dataset=ds, log=_quiet)
    first = train.train(_config(checkpoint=str(split), stop_after=1), dataset=ds, log=_quiet)
    assert first["epochs_done"] == 1
    after_one = _params(split)
    resumed = train.train(_config(checkpoint=str(split), resume=str(split)), dataset=ds, log=_quiet)
    assert resumed["epochs_done"] == 2
    a, b = torch.load(straight, weights_only=True), torch.load(split, weights_only=True)
    _assert_bitwise_equal(a["model"], b["model"])
    assert not all(torch.equal(after_one[k], b["model"][k]) for k in after_one)  # it moved
    # Optimizer and schedule state, and what comes next, are the same too.
    states = a["optimizer"]["state"], b["optimizer"]["state"]
    assert len(states[0]) == len(states[1]) == 10
    for pa, pb in zip(states[0].values(), states[1].values(), strict=True):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]
    assert torch.equal(a["data_order"], b["data_order"])
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]


def test_same_seed_and_threads_are_bitwise_identical(tmp_path):
    ds = _dataset()
    paths = [tmp_path / f"run{i}.pt" for i in range(3)]
    for path, seed in zip(paths, (0, 0, 1), strict=True):
        train.train(_config(epochs=1, checkpoint=str(path), seed=seed), dataset=ds, log=_quiet)
    runs = [_params(p) for p in paths]
    _assert_bitwise_equal(runs[0], runs[1])
    assert not torch.equal(runs[0]["conv1.weight"], runs[2]["conv1.weight"])


def test_interrupted_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    old = {"model": {"w": torch.randn(5)}, "epoch": 1}
    checkpoint.save_checkpoint(old, path)
    real_save = torch.save

    def dies_halfway(obj, f, *args, **kwargs):
        real_save({"partial": torch.randn(1000)}, f)  # some bytes reach the file, then:
        raise OSError("disk full (simulated)")

    for error in (OSError, KeyboardInterrupt):
        if error is KeyboardInterrupt:

            def dies_halfway(obj, f, *args, **kwargs):
                f.write(b"\x00" * 4096)
                raise KeyboardInterrupt

        monkeypatch.setattr(torch, "save", dies_halfway)
        with pytest.raises(error):
            checkpoint.save_checkpoint({"model": {"w": torch.randn(5)}, "epoch": 2}, path)
        monkeypatch.setattr(torch, "save", real_save)
        kept = torch.load(path, weights_only=True)
        assert kept["epoch"] == 1 and torch.equal(kept["model"]["w"], old["model"]["w"])
        assert os.listdir(tmp_path) == ["ck.pt"]  # no temporary file left behind


def test_failed_save_during_training_leaves_a_resumable_checkpoint(tmp_path, monkeypatch):
    ds = _dataset()
    path = tmp_path / "ck.pt"
    real = checkpoint.save_checkpoint
    calls = []

    def fail_second(state, p):
        calls.append(state["epoch"])
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real(state, p)

    monkeypatch.setattr(checkpoint, "save_checkpoint", fail_second)
    with pytest.raises(OSError):
        train.train(_config(checkpoint=str(path)), dataset=ds, log=_quiet)
    monkeypatch.setattr(checkpoint, "save_checkpoint", real)
    assert torch.load(path, weights_only=True)["epoch"] == 1
    m = train.train(_config(checkpoint=str(path), resume=str(path)), dataset=ds, log=_quiet)
    assert m["epochs_done"] == 2


def test_metrics_json(tmp_path):
    path = tmp_path / "sub" / "metrics.json"
    m = train.train(_config(metrics=str(path), lr=None), dataset=_dataset(), log=_quiet)
    saved = json.loads(path.read_text())
    assert saved["test_accuracy"] == m["test_accuracy"]
    for key in ("test_accuracy", "train_seconds", "samples_per_second"):
        assert saved[key] > 0
    assert [row["epoch"] for row in saved["epochs"]] == [1, 2]
    for row in saved["epochs"]:
        assert 0 <= row["test_accuracy"] <= 1 and row["train_loss"] > 0
        assert 0 <= row["train_accuracy"] <= 1
    assert saved["config"]["lr"] == train.DEFAULT_LR["sgd"]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal():
    config = _config(progress=True)
    assert report.progress(config, True, 0, 100, stream=io.StringIO()) is None  # a log file
    assert report.progress(config, False, 0, 100, stream=_Terminal()) is None  # not rank 0
    bar = report.progress(config, True, 0, 100, stream=_Terminal())
    report.progress_step(bar, 100, 0, 1, torch.tensor(0.5), 1.0)
    bar.close()
    assert bar.n == 100


def test_compare_stock_reports_both_models(tmp_path):
    lines = []
    m = train.train(_config(epochs=1, compare_stock=True), dataset=_dataset(), log=lines.append)
    s = m["stock"]
    steps = data.num_batches(200, 32)
    assert len(s["step_loss_fused"]) == len(s["step_loss_stock"]) == steps
    # Same weights, same batches: the first steps agree to rounding (see test_models).
    first_fused, first_stock = s["step_loss_fused"][0], s["step_loss_stock"][0]
    assert abs(first_fused - first_stock) / first_stock < 1e-5
    assert s["max_rel_loss_diff"] < report.PARITY_TOL
    assert s["steps_within_parity_tol"] == steps
    assert 0 <= s["test_accuracy"] <= 1 and s["speedup"] > 0
    assert any("speedup" in line for line in lines)


def test_resume_refuses_to_change_the_run(tmp_path):
    ds = _dataset()
    path = tmp_path / "ck.pt"
    train.train(_config(checkpoint=str(path), stop_after=1), dataset=ds, log=_quiet)
    with pytest.raises(ValueError, match=r"--lr 0\.1 differs from the checkpoint's 0\.05"):
        train.train(_config(resume=str(path), lr=0.1), dataset=ds, explicit=("lr",), log=_quiet)
    # Settings that do not define the run may change: threads here.
    m = train.train(_config(resume=str(path), threads=1), dataset=ds, log=_quiet)
    assert m["epochs_done"] == 2
    done = tmp_path / "done.pt"
    train.train(_config(checkpoint=str(done)), dataset=ds, log=_quiet)
    with pytest.raises(ValueError, match="already holds all 2 epochs"):
        train.train(_config(resume=str(done)), dataset=ds, log=_quiet)


def test_eval_fastlenet_and_stock_checkpoints(tmp_path):
    ds = _dataset()
    path = tmp_path / "ck.pt"
    m = train.train(_config(checkpoint=str(path)), dataset=ds, log=_quiet)
    r = train.evaluate_checkpoint(str(path), dataset=ds, threads=THREADS)
    assert r["model"] == "lenet5" and r["count"] == 64
    assert r["test_accuracy"] == m["test_accuracy"]
    # A plain state_dict of the stock model, saved with torch.save.
    stock = LeNet5(fused=False)
    stock.load_state_dict(_params(path))
    plain = tmp_path / "stock.pt"
    torch.save(stock.state_dict(), plain)
    r2 = train.evaluate_checkpoint(str(plain), dataset=ds, threads=THREADS)
    assert r2["model"] == "lenet5" and r2["test_accuracy"] == m["test_accuracy"]
    with torch.no_grad():
        direct = (stock(ds.test_images).argmax(1) == ds.test_labels).float().mean().item()
    assert abs(r2["test_accuracy"] - direct) < 1e-9


# ----------------------------------------------------------------------------- the CLI


def test_cli_train_then_eval(tmp_path, idx_dir, capsys):
    ck, metrics = tmp_path / "ck.pt", tmp_path / "m.json"
    common = ["--data-dir", str(idx_dir), "--threads", str(THREADS)]
    rc = main(
        [
            *("train", *common, "--epochs", "1", "--batch-size", "32", "--no-progress"),
            *("--checkpoint", str(ck), "--metrics", str(metrics), "--device", "cpu"),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "samples/s" in out
    accuracy = json.loads(metrics.read_text())["test_accuracy"]
    assert main(["eval", "--checkpoint", str(ck), *common, "--device", "cpu"]) == 0
    assert f"{100 * accuracy:.2f}%" in capsys.readouterr().out


USER_MODEL = """
import torch
from torch import nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 5), nn.ReLU(), nn.MaxPool2d(2))
        self.fc1 = nn.Linear(4 * 12 * 12, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(torch.flatten(self.features(x), 1))))
"""


def test_cli_trains_a_user_model_fused_beside_stock(tmp_path, idx_dir, capsys, monkeypatch):
    (tmp_path / "user_net.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    metrics = tmp_path / "m.json"
    argv = ["train", "--model", "user_net:Net", "--compare-stock", "--data-dir", str(idx_dir)]
    argv += ["--epochs", "1", "--batch-size", "32", "--no-progress", "--device", "cpu"]
    assert main([*argv, "--threads", str(THREADS), "--metrics", str(metrics)]) == 0
    out = capsys.readouterr().out
    assert "fastlenet.fuse: 2 fused, 0 left alone" in out
    assert "features.0: conv2d -> ReLU -> max_pool2d" in out and "fc1: linear -> ReLU" in out
    # fc2 (no ReLU) ends the chain the three layers make
    assert "chain: features.0, flatten, fc1, fc2 -> one autograd node" in out
    stock = json.loads(metrics.read_text())["stock"]
    assert stock["max_rel_loss_diff"] < report.PARITY_TOL


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--data-dir", "/nonexistent/x"], "no directory /nonexistent/x"),
        (
            ["train", "--dataset", "fashion-mnist", "--data-dir", "/nonexistent"],
            "apt-get install dataset-fashion-mnist",
        ),
        (["eval", "--checkpoint", "/nonexistent.pt"], "no such file"),
    ],
)
def test_cli_errors_are_one_message(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_bad_checkpoints(tmp_path, idx_dir, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    common = ["--data-dir", str(idx_dir), "--threads", str(THREADS), "--device", "cpu"]
    assert main(["eval", "--checkpoint", str(garbage), *common]) == 1
    assert "unreadable" in capsys.readouterr().err
    # A stock Fashion-MNIST CNN evaluated as LeNet-5: keys do not fit.
    fashion = tmp_path / "fashion.pt"
    torch.save(FashionCNN(fused=False).state_dict(), fashion)
    assert main(["eval", "--checkpoint", str(fashion), "--model", "lenet5", *common]) == 1
    assert "does not fit the model" in capsys.readouterr().err
    # Wrong shapes under the right keys.
    sd = LeNet5(fused=False).state_dict()
    sd["fc1.weight"] = torch.randn(120, 300)
    bad = tmp_path / "bad.pt"
    torch.save(sd, bad)
    assert main(["eval", "--checkpoint", str(bad), *common]) == 1
    assert "size mismatch" in capsys.readouterr().err
    # A plain state_dict cannot be resumed.
    assert main(["train", "--resume", str(fashion), *common]) == 1
    assert "no optimizer or data-order state" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--epochs", "0"],
        ["train", "--batch-size", "-3"],
        ["train", "--lr", "nan"],
        ["train", "--momentum", "1.5"],
        ["train", "--model", "resnet"],
        ["train", "--model", "no_such_module:Net"],
        ["train", "--model", "os:path"],
        ["train", "--backend", "gpu"],
        ["bogus"],
        ["eval"],
    ],
)
def test_cli_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_module_entry_point_reports_without_traceback(tmp_path):
    # The real `python -m fastlenet` process: non-zero exit, one message, no traceback.
    proc = subprocess.run(
        [sys.executable, "-m", "fastlenet", "eval", "--checkpoint", str(tmp_path / "none.pt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "fastlenet: error:" in proc.stderr and "Traceback" not in proc.stderr
