"""Checkpoints: writing them atomically, reading them back, and checking a resumed run.

A fastlenet checkpoint is a dict saved by torch.save: {"format": CHECKPOINT_FORMAT, "version":
CHECKPOINT_VERSION, "config": the run settings, "num_classes", "epoch" (epochs done), "model",
"optimizer", "scheduler", "data_order" (state of the generator that draws each epoch's
permutation), "torch_rng", "history" (one metrics row per epoch), "train_seconds", and with
--compare-stock "stock" (its model, optimizer, scheduler) and "step_loss"}. fastlenet.train
writes one at every epoch end and restores it on --resume; `fastlenet eval` also reads a plain
state_dict of the stock or fused model.
"""

import contextlib
import dataclasses
import os
import tempfile
from typing import TYPE_CHECKING

import torch

from fastlenet.models import MODELS

if TYPE_CHECKING:
    from fastlenet.train import TrainConfig

CHECKPOINT_FORMAT = "fastlenet.checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that cannot be read or does not fit the model."""


def save_checkpoint(state: dict, path) -> None:
    """torch.save(state, path) so that `path` always holds either the old or the new checkpoint:
    write a temporary file beside it, fsync, then rename it over `path` (atomic on POSIX)."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; torch.save would not
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load_checkpoint(path) -> dict:
    """A fastlenet checkpoint, or {"model": sd} for a plain state_dict saved by torch.save."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged or foreign file
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path}: unreadable ({first_line})") from e
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        if obj.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(
                f"checkpoint {path}: format version {obj.get('version')}, this fastlenet reads "
                f"{CHECKPOINT_VERSION}"
            )
        return obj
    if isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        return {"model": obj, "plain": True}
    raise CheckpointError(
        f"checkpoint {path}: neither a fastlenet checkpoint nor a model state_dict"
    )


def infer_model(state_dict) -> tuple[str, int]:
    """(model name, num_classes) of a plain LeNet-5 or Fashion-MNIST CNN state_dict."""
    keys = set(state_dict)
    for name, cls in MODELS.items():
        expected = set(cls(fused=False).state_dict())
        if keys == expected:
            last = "fc3.weight" if name == "lenet5" else "fc.weight"
            return name, int(state_dict[last].shape[0])
    raise CheckpointError(
        f"state_dict keys {sorted(keys)} match neither model ({', '.join(MODELS)})"
    )


def load_weights(model, state_dict, path) -> None:
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise CheckpointError(f"checkpoint {path} does not fit the model: {detail}") from e


# ----------------------------------------------------------------------------- resume


def _resume_config(config, ckpt, explicit, path) -> "TrainConfig":
    """The config of a resumed run: the checkpoint's run settings (those config.run_settings()
    names: fastlenet.train.RUN_KEYS), the rest from `config`. A run setting given explicitly
    (in `explicit`) that differs is an error."""
    given = config.run_settings()
    saved = ckpt.get("config") or {}
    missing = [k for k in given if k not in saved]
    if missing:
        raise CheckpointError(f"checkpoint {path}: lacks the run settings {missing}")
    for key, value in given.items():
        if key in explicit and value != saved[key]:
            raise ValueError(
                f"--{key.replace('_', '-')} {value} differs from the checkpoint's {saved[key]}: "
                "a resumed run continues the checkpoint's schedule (start a new run instead)"
            )
    return dataclasses.replace(config, **{k: saved[k] for k in given})


def prepare_resume(config, explicit=()) -> tuple["TrainConfig", dict | None]:
    """(config, checkpoint) of a run: for --resume, the checkpoint loaded and checked, and the
    config with the checkpoint's run settings; otherwise (config, None)."""
    if not config.resume:
        return config, None
    ckpt = load_checkpoint(config.resume)
    if ckpt.get("plain"):
        raise CheckpointError(
            f"checkpoint {config.resume}: a plain state_dict holds no optimizer or data-order "
            "state to resume from (use it with `fastlenet eval`)"
        )
    config = _resume_config(config, ckpt, explicit, config.resume)
    if config.compare_stock and "stock" not in ckpt:
        raise CheckpointError(
            f"checkpoint {config.resume} was written without --compare-stock: resume it "
            "without that flag"
        )
    return config, ckpt
