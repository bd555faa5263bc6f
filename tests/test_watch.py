"""Watching training: --tensorboard event files (read back with TensorBoard's own reader), rank 0
alone writing under DDP, --plot's picture and the curve data in --metrics, `fastlenet plot`,
and neither tensorboard nor matplotlib imported without their options.

Small synthetic datasets (fastlenet.data.synthetic) keep each run to a second or two: 200
training images at batch 32 are 7 steps per epoch (6 of 32 images, the last of 8).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fastlenet import data, distributed, plot, tensorboard_log, train
from fastlenet.__main__ import main

THREADS = 2
STEPS = 7  # per epoch: 200 images at batch 32
BATCH_SIZES = [32] * 6 + [8]
SCALARS = {*tensorboard_log.STEP_TAGS, *tensorboard_log.EPOCH_TAGS}


def _dataset():
    return data.synthetic(n_train=200, n_test=64, seed=0)


def _config(**kw):
    base = dict(epochs=2, batch_size=32, threads=THREADS, progress=False, device="cpu")
    base.update(kw)
    return train.TrainConfig(**base)


def _quiet(_line):
    pass


def _events(run_dir):
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return acc


def _scalars(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _window_means(step_losses, points):
    """The mean loss per sample over the steps between consecutive log points (1-based global
    steps), each step's loss weighted by its batch size."""
    sizes = BATCH_SIZES * (len(step_losses) // STEPS)
    weighted = [loss * b for loss, b in zip(step_losses, sizes, strict=True)]
    means, start = [], 0
    for end in points:
        means.append(sum(weighted[start:end]) / sum(sizes[start:end]))
        start = end
    return means


def test_event_files_hold_the_tags_and_steps(tmp_path):
    tb = tmp_path / "tb"
    m = train.train(
        _config(compare_stock=True, tensorboard=str(tb), log_every=3),
        dataset=_dataset(),
        log=_quiet,
    )
    assert sorted(os.listdir(tb)) == ["fastlenet", "stock"]
    # Every 3 steps of an epoch and at its last (7), as global steps over the 2 epochs.
    points = [3, 6, 7, 10, 13, 14]
    lrs = _lrs(_config(), 2 * STEPS)
    for name, prefix in (("fastlenet", ""), ("stock", "stock_")):
        acc = _events(tb / name)
        assert set(acc.Tags()["scalars"]) == SCALARS
        for tag in tensorboard_log.STEP_TAGS:
            assert [s for s, _ in _scalars(acc, tag)] == points, (name, tag)
        # The loss logged is the mean over the steps since the previous point (checked against
        # the per-step losses --compare-stock keeps), without a host sync per step.
        step_losses = m["stock"][f"step_loss_{'fused' if name == 'fastlenet' else 'stock'}"]
        logged = [v for _, v in _scalars(acc, "train/loss")]
        assert logged == pytest.approx(_window_means(step_losses, points), rel=1e-6)
        # The learning rate of each point's last step.
        logged_lr = [v for _, v in _scalars(acc, "train/lr")]
        assert logged_lr == pytest.approx([lrs[s - 1] for s in points], rel=1e-6, abs=1e-12)
        assert all(v > 0 for _, v in _scalars(acc, "train/samples_per_second"))
        # Test loss and accuracy at each epoch's last step, as the history holds them.
        for tag, key in (("test/accuracy", "test_accuracy"), ("test/loss", "test_loss")):
            got = _scalars(acc, tag)
            assert [s for s, _ in got] == [STEPS, 2 * STEPS]
            want = [row[prefix + key] for row in m["epochs"]]
            assert [v for _, v in got] == pytest.approx(want, rel=1e-6)
        # The settings as text.
        assert acc.Tags()["tensors"] == ["config/text_summary"]
        (text,) = acc.Tensors("config/text_summary")
        table = text.tensor_proto.string_val[0].decode()
        assert "| batch_size | 32 |" in table and f"| lr | {train.DEFAULT_LR['sgd']:g} |" in table
        assert ("stock PyTorch" in table) == (name == "stock")


def _lrs(config, steps):
    """The learning rate of each of `steps` steps under config's schedule."""
    import torch

    param = torch.zeros(1, requires_grad=True)
    opt, sched = train.build_optimizer(config, [param], STEPS)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_resumed_run_continues_the_steps(tmp_path):
    ds = _dataset()
    straight, split = tmp_path / "straight", tmp_path / "split"
    train.train(_config(tensorboard=str(straight), log_every=3), dataset=ds, log=_quiet)
    ck, ck1 = tmp_path / "ck.pt", tmp_path / "ck1.pt"
    cfg = dict(tensorboard=str(split), log_every=3, checkpoint=str(ck))
    train.train(_config(stop_after=1, **cfg), dataset=ds, log=_quiet)
    shutil.copy(ck, ck1)
    train.train(_config(resume=str(ck), **cfg), dataset=ds, log=_quiet)
    # Epoch 2 again from the epoch-1 checkpoint into the same directory: TensorBoard drops the
    # points the earlier resumed run wrote after step 7 (purge_step), so each step shows once.
    train.train(_config(resume=str(ck1), **cfg), dataset=ds, log=_quiet)
    a, b = _events(straight / "fastlenet"), _events(split / "fastlenet")
    for tag in ("train/loss", "train/lr", "test/loss", "test/accuracy"):
        # The same batches and weights (resume is bitwise): the same values at the same steps.
        assert _scalars(b, tag) == _scalars(a, tag), tag
    assert [s for s, _ in _scalars(b, "train/loss")] == [3, 6, 7, 10, 13, 14]


@pytest.mark.slow
def test_ddp_rank0_alone_writes(tmp_path):
    ds = _dataset()
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    train.train(_config(epochs=1, tensorboard=str(single), log_every=2), dataset=ds, log=_quiet)
    distributed.run(_config(epochs=1, tensorboard=str(ddp), log_every=2, nproc=2), dataset=ds)
    # One event file from one process (its pid is in the name): rank 1 wrote nothing.
    files = [os.path.relpath(os.path.join(d, f), ddp) for d, _, fs in os.walk(ddp) for f in fs]
    assert len(files) == 1 and files[0].startswith("fastlenet/events.out.tfevents.")
    acc = _events(ddp / "fastlenet")
    assert set(acc.Tags()["scalars"]) == SCALARS
    # The logged loss is the mean over the global batches (reduced over both ranks), not rank
    # 0's half: it equals one process's to float32 rounding (see test_distributed).
    want = _scalars(_events(single / "fastlenet"), "train/loss")
    got = _scalars(acc, "train/loss")
    assert [s for s, _ in got] == [s for s, _ in want] == [2, 4, 6, 7]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5)


# ----------------------------------------------------------------------------- plot, metrics


def _pixels_near(image, hex_color, tol=0.02):
    rgb = [int(hex_color[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    return int((abs(image[..., :3] - rgb) < tol).all(-1).sum())


def test_plot_and_metrics_curve(tmp_path):
    import matplotlib.image

    png, metrics_path = tmp_path / "out" / "acc.png", tmp_path / "m.json"
    m = train.train(
        _config(compare_stock=True, plot=str(png), metrics=str(metrics_path)),
        dataset=_dataset(),
        log=_quiet,
    )
    # The curve data in --metrics: each epoch's accuracy at the training seconds so far.
    saved = json.loads(metrics_path.read_text())
    rows = saved["epochs"]
    for prefix in ("", "stock_"):
        elapsed = [row[prefix + "elapsed_train_seconds"] for row in rows]
        per_epoch = [row[prefix + "train_seconds"] for row in rows]
        assert elapsed == pytest.approx([per_epoch[0], per_epoch[0] + per_epoch[1]])
        assert 0 < elapsed[0] < elapsed[1]
    assert rows[-1]["elapsed_train_seconds"] == pytest.approx(m["train_seconds"])
    assert rows[-1]["stock_elapsed_train_seconds"] == pytest.approx(m["stock"]["train_seconds"])
    # A valid PNG with both series and the 99% line.
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    for color in plot.COLORS.values():
        assert _pixels_near(image, color) > 100
    ax = plot.figure(saved).axes[0]
    lines = {line.get_label().split(":")[0]: line for line in ax.get_lines()}
    assert set(lines) == {"fastlenet", "stock PyTorch", "99%"}
    for label, prefix in (("fastlenet", ""), ("stock PyTorch", "stock_")):
        x, y = lines[label].get_data()
        assert list(x) == [row[prefix + "elapsed_train_seconds"] for row in rows]
        assert list(y) == pytest.approx([100 * row[prefix + "test_accuracy"] for row in rows])
    assert list(lines["99%"].get_ydata()) == [99.0, 99.0]


def test_plot_without_stock_and_to_99():
    rows = [
        {"test_accuracy": 0.985, "elapsed_train_seconds": 1.5},
        {"test_accuracy": 0.991, "elapsed_train_seconds": 3.0},
        {"test_accuracy": 0.993, "elapsed_train_seconds": 4.5},
    ]
    metrics = {"model": "lenet5", "dataset": "mnist", "threads": 2, "epochs_done": 3}
    assert plot.curves({**metrics, "epochs": rows}) == {
        "fastlenet": ([1.5, 3.0, 4.5], [0.985, 0.991, 0.993])
    }
    labels = [line.get_label() for line in plot.figure({**metrics, "epochs": rows}).axes[0].lines]
    assert labels == ["fastlenet: 99% after 3.0 s", "99%"]
    # Rows of a checkpoint written before elapsed_train_seconds: summed per-epoch seconds.
    old = [
        {"test_accuracy": 0.9, "train_seconds": 2.0},
        {"test_accuracy": 0.95, "train_seconds": 2.5},
    ]
    assert plot.curves({**metrics, "epochs": old})["fastlenet"] == ([2.0, 4.5], [0.9, 0.95])


# ----------------------------------------------------------------------------- the CLI


def _train_argv(idx_dir, *extra):
    return [
        *("train", "--data-dir", str(idx_dir), "--threads", str(THREADS), "--device", "cpu"),
        *("--epochs", "1", "--batch-size", "32", "--no-progress", *extra),
    ]


def test_cli_tensorboard_plot_and_redraw(tmp_path, idx_dir, capsys):
    tb, png, metrics = tmp_path / "tb", tmp_path / "acc.png", tmp_path / "m.json"
    argv = _train_argv(idx_dir, "--tensorboard", str(tb), "--log-every", "2", "--plot", str(png))
    assert main([*argv, "--metrics", str(metrics)]) == 0
    out = capsys.readouterr().out
    assert f"tensorboard --logdir {tb}" in out and "plot: test accuracy" in out
    assert os.listdir(tb) == ["fastlenet"]  # no stock run without --compare-stock
    acc = _events(tb / "fastlenet")
    assert [s for s, _ in _scalars(acc, "train/loss")] == [2, 4]  # 128 images: 4 steps
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # `fastlenet plot` redraws it from the metrics JSON.
    again = tmp_path / "again.png"
    assert main(["plot", str(metrics), str(again)]) == 0
    assert again.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main(["plot", str(idx_dir / "train-images-idx3-ubyte.gz"), str(again)]) == 1
    assert "not a --metrics JSON" in capsys.readouterr().err


def test_cli_bad_watch_options(tmp_path, idx_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(_train_argv(idx_dir, "--log-every", "0"))
    assert exc.value.code == 2
    capsys.readouterr()
    assert main(_train_argv(idx_dir, "--plot", str(tmp_path / "acc.txt"))) == 1
    assert "plot must be a file ending in one of .png" in capsys.readouterr().err
    assert not (tmp_path / "acc.txt").exists()


_IMPORTS = """
import json, sys
from fastlenet.__main__ import main
assert main(sys.argv[1:]) == 0
tb = "torch.utils.tensorboard"
print(json.dumps(sorted(
    m for m in sys.modules
    if m.split(".")[0] in ("tensorboard", "matplotlib") or m == tb or m.startswith(tb + ".")
)))
"""


@pytest.mark.slow
def test_nothing_imported_without_the_options(tmp_path, idx_dir):
    def modules_after(*extra):
        proc = subprocess.run(
            [sys.executable, "-c", _IMPORTS, *_train_argv(idx_dir, *extra)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    assert modules_after() == []
    assert not list(tmp_path.glob("**/events.out.tfevents.*"))
    # The check sees them when the options are given.
    seen = modules_after("--tensorboard", str(tmp_path / "tb"), "--plot", str(tmp_path / "a.png"))
    assert {"tensorboard", "torch.utils.tensorboard", "matplotlib"} <= set(seen)
