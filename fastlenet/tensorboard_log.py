"""TensorBoard event files of a training run: `fastlenet train --tensorboard DIR`.

Written through torch.utils.tensorboard.SummaryWriter, as the PyTorch tutorials do, and watched
with `tensorboard --logdir DIR`. One TensorBoard run per model: DIR/fastlenet and, with
--compare-stock, DIR/stock beside it, so the two curves of each tag overlay. Every point is at
the global step (optimizer steps done since the start of training, as the tutorials'
`epoch * len(loader) + i`):

  train/loss                mean training loss over the samples since the previous point
  train/lr                  learning rate of the last step
  train/samples_per_second  over the steps since the previous point (the model's own steps)
  test/loss, test/accuracy  at the end of each epoch
  config (text)             the run's settings, at the first step of the run

Training points come every --log-every steps of an epoch and at its last step. fastlenet.train
imports this module only when --tensorboard is given, and only on rank 0.
"""

import os

from torch.utils.tensorboard import SummaryWriter

RUNS = ("fastlenet", "stock")
STEP_TAGS = ("train/loss", "train/lr", "train/samples_per_second")
EPOCH_TAGS = ("test/loss", "test/accuracy")
# Each run's history-row key for each epoch tag (see fastlenet.train._evaluate_epoch).
_EPOCH_KEYS = {
    "fastlenet": {"test/loss": "test_loss", "test/accuracy": "test_accuracy"},
    "stock": {"test/loss": "stock_test_loss", "test/accuracy": "stock_test_accuracy"},
}


class Writer:
    """One SummaryWriter per model trained, under `directory`.

    config_texts: {run name: markdown of its settings}, which also names the runs.
    start_step: the global step the run starts from (after --resume, the checkpoint's); points
    an earlier run wrote after it (one interrupted after its last checkpoint, or a run resumed
    from the same checkpoint before) are discarded by TensorBoard (purge_step)."""

    def __init__(self, directory, config_texts, start_step=0):
        unknown = set(config_texts) - set(RUNS)
        if unknown:
            raise ValueError(f"unknown TensorBoard runs {sorted(unknown)}, expected {RUNS}")
        self.run_dirs = {name: os.path.join(directory, name) for name in config_texts}
        self.writers = {
            name: SummaryWriter(path, purge_step=start_step + 1 if start_step else None)
            for name, path in self.run_dirs.items()
        }
        for name, text in config_texts.items():
            self.writers[name].add_text("config", text, start_step)

    def add(self, step, values):
        """values: {run name: {tag: value}} at global step `step`."""
        for name, tags in values.items():
            writer = self.writers[name]
            for tag, value in tags.items():
                if value is not None:
                    writer.add_scalar(tag, value, step)

    def add_epoch(self, step, row):
        """The epoch's test loss and accuracy from its history row, at global step `step`; then
        everything written so far goes to disk (an epoch's points show up at its end)."""
        for name, writer in self.writers.items():
            for tag, key in _EPOCH_KEYS[name].items():
                if key in row:
                    writer.add_scalar(tag, row[key], step)
            writer.flush()

    def close(self):
        for writer in self.writers.values():
            writer.close()
