"""Training of the fused models: the loop behind `python -m fastlenet train` (and `eval`).

One step: index the in-memory training tensors with the next slice of a seeded permutation,
forward, cross-entropy (mean over the batch), backward, optimizer step, one-cycle LR step.

Resumable and reproducible: a checkpoint written at every epoch end (fastlenet.checkpoint)
holds the model, optimizer, LR schedule, torch RNG state and the state of the generator that
draws each epoch's permutation, so training 2 epochs straight and 1 epoch + resume for 1 give
bitwise equal parameters on CPU at a fixed thread count. A checkpoint records the training
settings; a resumed run continues that schedule.

--compare-stock trains the stock model (`fused=False`) from the same initial weights on the
same batches beside the fused one, timing each model's steps separately.

train() in steps: _set_up (threads, device, data, models, optimizers), _restore (--resume),
then per epoch _train_epoch, _evaluate_epoch and _save_checkpoint. What it prints and returns
is made by fastlenet.report.

Watching a run: --tensorboard DIR writes TensorBoard event files (fastlenet.tensorboard_log:
training loss, learning rate and samples/s every --log-every steps, test loss and accuracy
per epoch), --plot PATH draws test accuracy against training seconds (fastlenet.plot). Each
is imported only when its option is given, and only by rank 0.
"""

import dataclasses
import math
import os
import time

import torch
import torch.nn.functional as F

from fastlenet import backends, checkpoint, data, models, report

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("onecycle", "constant")
# The default run (make train): LeNet-5 on MNIST, batch 128, SGD momentum 0.9, one-cycle LR
# peaking at 0.1, weight decay 5e-4, 3 epochs: >= 99.0% in <= 3 s of training on the 2-core
# machine. Measured on 2 threads, seeds 0/1/2 (test accuracy, training seconds on a shared VM):
# 99.26 / 99.15 / 99.09%, 3.0 / 2.4 / 2.6 s. Rejected: batch 64 lr 0.05 (3 epochs: 99.20% but
# 3.4 s; 2 epochs: 98.98-99.16%), lr 0.08 (99.20 / 99.14 / 99.07%), batch 256 lr 0.1
# (3 epochs: 98.56-99.04%; 4 epochs: 99.13-99.22% in 2.4-3.1 s), batch 256 lr 0.2 (97.0-98.9%).
# Adam: the usual 1e-3 doubled as a one-cycle peak, no weight decay.
DEFAULT_LR = {"sgd": 0.1, "adam": 2e-3}
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "adam": 0.0}
DEFAULT_EPOCHS = 3
DEFAULT_BATCH = 128
DEFAULT_LOG_EVERY = 50  # steps between TensorBoard points of the training loss
# What --plot can write (matplotlib infers the format from the suffix).
PLOT_FORMATS = (".png", ".svg", ".pdf")
EVAL_BATCH = 1000  # evaluation only holds activations of this many images at once

# Settings that define a training run: a resumed run must keep them (its schedule, batches and
# model depend on them). Every other setting (threads, backend, paths, ...) may change.
RUN_KEYS = (
    "dataset",
    "model",
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "optimizer",
    "schedule",
    "seed",
)


@dataclasses.dataclass
class TrainConfig:
    dataset: str = "mnist"
    data_dir: str | None = None
    model: str = "lenet5"
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_BATCH
    lr: float | None = None  # None: DEFAULT_LR[optimizer]
    momentum: float = 0.9
    weight_decay: float | None = None  # None: DEFAULT_WEIGHT_DECAY[optimizer]
    optimizer: str = "sgd"
    schedule: str = "onecycle"
    backend: str = "auto"
    device: str | None = None  # None: cuda when available, else cpu
    threads: int | None = None  # None: every core this process may run on
    seed: int = 0
    checkpoint: str | None = None
    resume: str | None = None
    metrics: str | None = None
    compare_stock: bool = False
    stop_after: int | None = None  # stop once this many epochs are done (resume later)
    nproc: int = 1
    progress: bool = True
    tensorboard: str | None = None  # directory of the TensorBoard runs
    log_every: int = DEFAULT_LOG_EVERY  # steps between TensorBoard points of the training loss
    plot: str | None = None  # file of the test accuracy vs training seconds picture

    def validate(self):
        """Raises ValueError naming the setting that is out of range."""

        def positive(name, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")

        if self.dataset not in data.DATASETS:
            raise ValueError(f"dataset must be one of {data.DATASETS}, got {self.dataset!r}")
        models.model_class(self.model)  # a built-in name or an importable module:Class
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        backends.check_choice(self.backend)
        for name in ("epochs", "batch_size", "nproc", "log_every"):
            positive(name)
        positive("threads", allow_none=True)
        positive("stop_after", allow_none=True)
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (0 <= self.momentum < 1):
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.weight_decay is not None and not (
            self.weight_decay >= 0 and math.isfinite(self.weight_decay)
        ):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.device is not None and self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch sees no CUDA device")
        if self.compare_stock and self.nproc > 1:
            raise ValueError("--compare-stock runs in one process: drop --nproc")
        if self.plot is not None and os.path.splitext(self.plot)[1].lower() not in PLOT_FORMATS:
            raise ValueError(
                f"plot must be a file ending in one of {', '.join(PLOT_FORMATS)}, got {self.plot!r}"
            )
        return self

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    @property
    def decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return DEFAULT_WEIGHT_DECAY[self.optimizer]

    def run_settings(self) -> dict:
        """The settings that define the run, defaults resolved (what a checkpoint records)."""
        settings = {k: getattr(self, k) for k in RUN_KEYS}
        settings["lr"], settings["weight_decay"] = self.peak_lr, self.decay
        return settings


@dataclasses.dataclass
class DistContext:
    """Where this process sits in a torch.distributed job (set up by fastlenet.distributed)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def resolve_device(config) -> torch.device:
    if config.device is not None:
        return torch.device(config.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- building blocks


def build_model(name, num_classes, fused, backend, device):
    """The fused or stock model (see fastlenet.models.build: user classes go through fuse)."""
    return models.build(name, num_classes, fused, backend).to(device)


def build_optimizer(config, params, steps_per_epoch):
    # fused=True: all parameters in one kernel per step (CPU and CUDA, the only devices here)
    # instead of a few ops per parameter; LeNet-5's SGD step with momentum and weight decay on
    # the 2-core CI VM: 371 -> 139 us, i.e. ~0.23 ms of each training step at batch 64.
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(
            params,
            lr=config.peak_lr,
            momentum=config.momentum,
            weight_decay=config.decay,
            fused=True,
        )
    else:
        opt = torch.optim.Adam(params, lr=config.peak_lr, weight_decay=config.decay, fused=True)
    if config.schedule == "onecycle":
        # cycle_momentum=False keeps --momentum (and Adam's beta1) as given.
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=config.peak_lr,
            total_steps=config.epochs * steps_per_epoch,
            cycle_momentum=False,
        )
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return opt, sched


@torch.no_grad()
def evaluate(model, images, labels, batch_size=EVAL_BATCH, dist=None) -> tuple[int, int, float]:
    """(correct, count, summed loss) of `model` on images/labels; under DDP each rank takes
    every world_size-th batch and the counts are summed over ranks."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rank, world = (dist.rank, dist.world_size) if dist else (0, 1)
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for i, start in enumerate(range(0, len(images), batch_size)):
        if i % world != rank:
            continue
        x = images[start : start + batch_size].to(device, non_blocking=True)
        y = labels[start : start + batch_size].to(device, non_blocking=True)
        out = model(x)
        totals[0] += (out.argmax(1) == y).sum()
        totals[1] += len(y)
        totals[2] += F.cross_entropy(out, y, reduction="sum").double()
    if world > 1:
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    correct, count, loss = totals.tolist()
    return int(correct), int(count), loss


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Runner:
    """One model with its optimizer and schedule, timing its own steps."""

    def __init__(self, model, opt, sched, device, step_model=None):
        self.model, self.opt, self.sched, self.device = model, opt, sched, device
        self.step_model = step_model or model  # the DDP wrapper under torch.distributed
        self.seconds = 0.0
        self.reset_epoch()

    def reset_epoch(self):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.correct = torch.zeros((), dtype=torch.int64, device=self.device)
        self.count = 0
        self.epoch_seconds0 = self.seconds
        # (loss sum, samples, seconds) of the epoch at the last TensorBoard point: _log_steps
        self.logged = (0.0, 0, self.seconds)
        self.lr = None  # the learning rate of the last step

    def step(self, x, y, loss_scale=None):
        """One training step; returns the loss tensor (mean over x)."""
        _sync(self.device)
        t0 = time.perf_counter()
        lr = self.opt.param_groups[0]["lr"]  # this step's: sched.step() sets the next one
        self.opt.zero_grad(set_to_none=True)
        out = self.step_model(x)
        if loss_scale is None:
            loss = F.cross_entropy(out, y)
            loss.backward()
        else:
            # Under DDP (which averages gradients over ranks) a rank's loss is its share of the
            # mean over the global batch: sum(local) * world_size / global_batch.
            loss_sum = F.cross_entropy(out, y, reduction="sum")
            (loss_sum * loss_scale).backward()
            loss = loss_sum.detach() / len(y)
        self.opt.step()
        self.sched.step()
        _sync(self.device)
        self.seconds += time.perf_counter() - t0
        loss = loss.detach()
        self.lr = lr
        self.loss_sum += loss.double() * len(y)
        self.correct += (out.detach().argmax(1) == y).sum()
        self.count += len(y)
        return loss

    def state(self):
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
        }

    def load(self, state, path):
        checkpoint.load_weights(self.model, state["model"], path)
        try:
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise checkpoint.CheckpointError(
                f"checkpoint {path}: optimizer state does not fit ({e})"
            ) from e


# ----------------------------------------------------------------------------- the loop's steps


@dataclasses.dataclass
class Run:
    """What one training run works on: made by _set_up, carried on by the steps below and
    reported by fastlenet.report."""

    config: TrainConfig
    dist: DistContext
    threads: int
    device: torch.device
    dataset: data.Dataset  # its images and labels on `device`
    drop_last: bool  # the last batch of an epoch is dropped (see _set_up)
    backend: str  # the kernels the fused model runs on
    fused: _Runner
    stock: _Runner | None  # with --compare-stock
    order: torch.Generator  # draws each epoch's permutation
    start_epoch: int = 0
    history: list = dataclasses.field(default_factory=list)  # one row per epoch
    step_log: dict = dataclasses.field(default_factory=lambda: {"fused": [], "stock": []})
    steps_per_epoch: int = 0
    tensorboard: object = None  # a tensorboard_log.Writer on rank 0 with --tensorboard

    def runners(self):
        """(name, runner) of the models trained: fastlenet, then stock with --compare-stock."""
        named = [("fastlenet", self.fused), ("stock", self.stock)]
        return [(name, r) for name, r in named if r is not None]


def _set_up(config, dataset, dist) -> Run:
    """Threads, device, the data on the device, the model(s) with optimizer and schedule, and
    the generator of the batch order: everything before the first epoch."""
    threads = config.threads or default_threads()
    torch.set_num_threads(threads)
    device = resolve_device(config)
    if dist.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())

    dataset = _load_data(config, dataset)
    on_device = dataclasses.replace(
        dataset,
        train_images=dataset.train_images.to(device),
        train_labels=dataset.train_labels.to(device),
        test_images=dataset.test_images.to(device),
        test_labels=dataset.test_labels.to(device),
    )
    n_train = len(on_device.train_labels)
    # Under DDP every global batch is split across ranks; a final batch smaller than the number
    # of ranks would leave a rank without samples, so it is dropped (single process keeps it).
    drop_last = dist.world_size > 1 and n_train % config.batch_size < dist.world_size
    steps_per_epoch = data.num_batches(n_train, config.batch_size, drop_last)
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {n_train} training images")

    fused, stock, backend = _build_runners(
        config, dataset.num_classes, steps_per_epoch, device, dist
    )
    order = torch.Generator().manual_seed(config.seed)
    run = Run(config, dist, threads, device, on_device, drop_last, backend, fused, stock, order)
    run.steps_per_epoch = steps_per_epoch
    return run


def _load_data(config, dataset):
    """`dataset`, or config.dataset loaded when it is None; checked against the model's input."""
    image_size = models.input_size(config.model)[1:]
    if dataset is None:
        dataset = data.load(config.dataset, config.data_dir, pad_to=image_size)
    if dataset.image_size != image_size:
        raise ValueError(
            f"model {config.model} takes {image_size[0]}x{image_size[1]} images, the dataset "
            f"holds {dataset.image_size[0]}x{dataset.image_size[1]}"
        )
    return dataset


def _build_runners(config, num_classes, steps_per_epoch, device, dist):
    """(fused runner, stock runner or None, backend): the fused model from config.seed
    (wrapped in DistributedDataParallel under torch.distributed) and, with --compare-stock,
    the stock model from the same weights, each with its optimizer and schedule."""
    torch.manual_seed(config.seed)
    model = build_model(config.model, num_classes, True, config.backend, device)
    backend = backends.resolve(config.backend, device)
    step_model = model
    if dist.world_size > 1:
        step_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    opt, sched = build_optimizer(config, model.parameters(), steps_per_epoch)
    fused = _Runner(model, opt, sched, device, step_model)
    stock = None
    if config.compare_stock:
        stock_model = build_model(config.model, num_classes, False, "auto", device)
        stock_model.load_state_dict(model.state_dict())
        stock_opt = build_optimizer(config, stock_model.parameters(), steps_per_epoch)
        stock = _Runner(stock_model, *stock_opt, device)
    return fused, stock, backend


def _restore(run, ckpt, say) -> None:
    """Puts `run` where the checkpoint `ckpt` of --resume left it: models, optimizers,
    schedules, RNG and batch-order state, epochs done, history and training seconds."""
    path, epochs = run.config.resume, run.config.epochs
    run.fused.load(ckpt, path)
    if run.stock is not None:
        run.stock.load(ckpt["stock"], path)
    try:
        run.order.set_state(ckpt["data_order"])
        torch.set_rng_state(ckpt["torch_rng"])
        run.start_epoch = int(ckpt["epoch"])
        run.history = list(ckpt["history"])
        run.step_log = ckpt.get("step_loss", run.step_log)
        prior_seconds = ckpt.get("train_seconds", {"fused": 0.0, "stock": 0.0})
    except (KeyError, TypeError, RuntimeError) as e:
        raise checkpoint.CheckpointError(f"checkpoint {path}: incomplete ({e})") from e
    if run.start_epoch >= epochs:
        raise ValueError(f"checkpoint {path} already holds all {epochs} epochs")
    say(f"resuming {path} after epoch {run.start_epoch}/{epochs}")
    run.fused.seconds, stock_seconds = prior_seconds["fused"], prior_seconds["stock"]
    if run.stock is not None:
        run.stock.seconds = stock_seconds


def _train_epoch(run, epoch) -> float:
    """The training steps of one epoch, over the batches of its permutation; returns the
    seconds the fused model's steps took. With --compare-stock the stock model then takes the
    same steps on the same batches: each model runs its epoch step after step, as it would
    alone (interleaved, each step would start with the other model's data in the caches)."""
    config = run.config
    n_train = len(run.dataset.train_labels)
    batches = data.epoch_batches(n_train, config.batch_size, run.order, run.drop_last)
    total = sum(len(b) for b in batches)
    fused_seconds = 0.0
    for name, runner in run.runners():
        runner.reset_epoch()
        seconds0 = runner.seconds
        bar = report.progress(config, run.dist.is_main, epoch, total, name=name)
        # Per-step losses, compared after the run, only when there is a model to compare with.
        step_log = run.step_log["fused" if runner is run.fused else "stock"]
        for i, idx in enumerate(batches):
            loss = _step(run, runner, idx)
            if run.stock is not None:
                step_log.append(loss.item())
            if config.tensorboard and ((i + 1) % config.log_every == 0 or i == len(batches) - 1):
                _log_steps(run, name, runner, epoch * len(batches) + i + 1)
            if bar is not None:
                report.progress_step(
                    bar, len(idx), i, len(batches), loss, runner.seconds - seconds0
                )
        if bar is not None:
            bar.close()
        if runner is run.fused:
            fused_seconds = runner.seconds - seconds0
    return fused_seconds


def _step(run, runner, idx):
    """One training step of `runner`'s model on the global batch `idx` (under
    torch.distributed, on this rank's share of it); returns its loss."""
    dist, local_scale = run.dist, None
    if dist.world_size > 1:
        global_n = len(idx)
        idx = idx.tensor_split(dist.world_size)[dist.rank]
        local_scale = dist.world_size / global_n
    idx = idx.to(run.device)
    x, y = run.dataset.train_images[idx], run.dataset.train_labels[idx]
    return runner.step(x, y, local_scale)


def _log_steps(run, name, runner, global_step) -> None:
    """TensorBoard's point at `global_step` (every config.log_every steps of an epoch, and at
    its last) for the model `name`: its mean training loss over the samples since the last
    point, read from the sums the steps keep on the device (one host sync per point, none per
    step), the learning rate of the last step, and samples/s over those steps. Under
    torch.distributed every rank joins the reduction of the loss; rank 0 alone writes."""
    if run.dist.world_size > 1:
        totals = torch.stack([runner.loss_sum, runner.loss_sum.new_tensor(runner.count)])
        torch.distributed.all_reduce(totals)
        loss_sum, count = totals.tolist()
    else:
        loss_sum, count = runner.loss_sum.item(), runner.count
    logged_sum, logged_count, logged_seconds = runner.logged
    runner.logged = (loss_sum, count, runner.seconds)
    seconds = runner.seconds - logged_seconds
    values = {
        "train/loss": (loss_sum - logged_sum) / (count - logged_count),
        "train/lr": runner.lr,
        "train/samples_per_second": (count - logged_count) / seconds if seconds > 0 else 0.0,
    }
    if run.tensorboard is not None:
        run.tensorboard.add(global_step, {name: values})


def _evaluate_epoch(run, epoch, train_seconds, t_epoch) -> dict:
    """The epoch's row of the history: training loss and accuracy (summed over ranks), test
    loss and accuracy, time and rate; with --compare-stock the stock model's too."""
    fused = run.fused
    totals = torch.stack([fused.loss_sum, fused.correct.double()])
    count = torch.tensor(float(fused.count), dtype=torch.float64, device=run.device)
    totals = torch.cat([totals, count.view(1)])
    if run.dist.world_size > 1:
        torch.distributed.all_reduce(totals)
    loss_sum, correct, count = totals.tolist()
    test_x, test_y = run.dataset.test_images, run.dataset.test_labels
    test_correct, test_count, test_loss = evaluate(fused.model, test_x, test_y, dist=run.dist)
    row = {
        "epoch": epoch + 1,
        "train_loss": loss_sum / count,
        "train_accuracy": correct / count,
        "test_loss": test_loss / test_count,
        "test_accuracy": test_correct / test_count,
        "train_seconds": train_seconds,
        "elapsed_train_seconds": fused.seconds,  # all epochs so far: accuracy vs time
        "samples_per_second": count / train_seconds,
        "wall_seconds": time.perf_counter() - t_epoch,
    }
    if run.stock is not None:
        stock = run.stock
        s_correct, s_count, s_loss = evaluate(stock.model, test_x, test_y)
        row["stock_test_accuracy"] = s_correct / s_count
        row["stock_test_loss"] = s_loss / s_count
        row["stock_train_loss"] = stock.loss_sum.item() / stock.count
        row["stock_train_seconds"] = stock.seconds - stock.epoch_seconds0
        row["stock_elapsed_train_seconds"] = stock.seconds
    return row


def _save_checkpoint(run, epochs_done) -> None:
    """Writes the checkpoint of `run` after `epochs_done` epochs to config.checkpoint."""
    fused, stock = run.fused, run.stock
    state = {
        "format": checkpoint.CHECKPOINT_FORMAT,
        "version": checkpoint.CHECKPOINT_VERSION,
        "config": run.config.run_settings(),
        "num_classes": run.dataset.num_classes,
        "epoch": epochs_done,
        **fused.state(),
        "data_order": run.order.get_state(),
        "torch_rng": torch.get_rng_state(),
        "history": run.history,
        "train_seconds": {
            "fused": fused.seconds,
            "stock": stock.seconds if stock else 0.0,
        },
    }
    if stock is not None:
        state["stock"] = stock.state()
        state["step_loss"] = run.step_log
    checkpoint.save_checkpoint(state, run.config.checkpoint)


# ----------------------------------------------------------------------------- train


def train(config: TrainConfig, dataset=None, dist=None, explicit=(), log=None) -> dict:
    """Trains as `config` says and returns the metrics (also written to config.metrics).

    dataset: a data.Dataset to use instead of loading config.dataset (tests).
    dist: DistContext when running under torch.distributed (fastlenet.distributed sets it up).
    explicit: names of the settings the user gave (a resumed run refuses to change them).
    """
    config.validate()
    dist = dist or DistContext()
    main = dist.is_main
    say = (log or (lambda s: print(s, flush=True))) if main else (lambda s: None)
    wall0 = time.perf_counter()

    config, ckpt = checkpoint.prepare_resume(config, explicit)
    run = _set_up(config, dataset, dist)
    if ckpt is not None:
        _restore(run, ckpt, say)
    last_epoch = (
        config.epochs if config.stop_after is None else min(config.epochs, config.stop_after)
    )
    say(report.start_line(run))
    if config.tensorboard and main:
        from fastlenet import tensorboard_log

        run.tensorboard = tensorboard_log.Writer(
            config.tensorboard,
            {name: report.config_text(run, name) for name, _ in run.runners()},
            start_step=run.start_epoch * run.steps_per_epoch,
        )
        say(report.tensorboard_line(config, run.tensorboard.run_dirs))

    try:
        for epoch in range(run.start_epoch, last_epoch):
            t_epoch = time.perf_counter()
            train_seconds = _train_epoch(run, epoch)
            row = _evaluate_epoch(run, epoch, train_seconds, t_epoch)
            run.history.append(row)
            say(report.epoch_line(config, row))
            if run.tensorboard is not None:
                run.tensorboard.add_epoch((epoch + 1) * run.steps_per_epoch, row)
            if config.checkpoint and main:
                _save_checkpoint(run, epoch + 1)
            if dist.world_size > 1:
                torch.distributed.barrier()
    finally:
        if run.tensorboard is not None:
            run.tensorboard.close()

    metrics = report.metrics(run, wall0)
    if main:
        report.summary(say, config, metrics, last_epoch)
        if config.metrics:
            report.write_json(metrics, config.metrics)
        if config.plot and metrics["epochs"]:
            from fastlenet import plot

            plot.save(metrics, config.plot)
            say(f"plot: test accuracy vs training seconds in {config.plot}")
    return metrics


# ----------------------------------------------------------------------------- eval


def evaluate_checkpoint(
    path,
    dataset_name=None,
    data_dir=None,
    model_name=None,
    backend="auto",
    threads=None,
    device=None,
    dataset=None,
) -> dict:
    """Test accuracy of the model saved in `path` (a fastlenet checkpoint, or a plain
    state_dict of the stock or fused model), run on the fused model."""
    torch.set_num_threads(threads or default_threads())
    ckpt = checkpoint.load_checkpoint(path)
    if ckpt.get("plain"):
        inferred, num_classes = checkpoint.infer_model(ckpt["model"])
        saved_dataset = None
    else:
        try:
            inferred, num_classes = ckpt["config"]["model"], int(ckpt["num_classes"])
            saved_dataset = ckpt["config"]["dataset"]
        except (KeyError, TypeError, ValueError) as e:
            raise checkpoint.CheckpointError(f"checkpoint {path}: incomplete ({e})") from e
    name = model_name or inferred
    models.model_class(name)
    dataset_name = dataset_name or saved_dataset or "mnist"
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_model(name, num_classes, True, backends.check_choice(backend), dev)
    checkpoint.load_weights(model, ckpt["model"], path)
    image_size = models.input_size(name)[1:]
    if dataset is None:
        dataset = data.load(dataset_name, data_dir, pad_to=image_size)
    t0 = time.perf_counter()
    correct, count, loss = evaluate(model, dataset.test_images.to(dev), dataset.test_labels.to(dev))
    return {
        "checkpoint": path,
        "model": name,
        "dataset": dataset_name,
        "backend": backends.resolve(backend, dev),
        "test_accuracy": correct / count,
        "test_loss": loss / count,
        "correct": correct,
        "count": count,
        "seconds": time.perf_counter() - t0,
    }
