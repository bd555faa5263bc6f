"""The memory fastlenet's CPU ops keep for reuse.

The CPU ops take the memory of their large tensors (1 MiB and more: activations, gradients) from
an allocator that keeps a freed block for the next tensor of the same size (csrc/cpu_reuse.h),
so that a training step of the shapes of the last one maps no new memory (glibc would return it
to the system and fault it in again, page by page). At most 512 MiB is kept unused, the blocks
kept longest going first; `release_cached_buffers()` gives it back now, as
`torch.cuda.empty_cache()` does on a GPU. Each thread that runs the kernels also keeps up to 16
MiB of their freed scratch buffers (csrc/cpu_vec.h, ScratchCache), freed when the thread exits.
"""

from fastlenet import _ext


def release_cached_buffers() -> int:
    """Frees the memory the CPU ops keep for reuse; returns the bytes freed (0 without the
    extension)."""
    return int(_ext._C.release_reused()) if _ext.LOADED else 0


def cached_buffers() -> dict[str, int]:
    """{'kept': bytes kept for reuse, 'live': bytes of the CPU ops' large tensors still in use}."""
    if not _ext.LOADED:
        return {"kept": 0, "live": 0}
    return {k: int(v) for k, v in _ext._C.reuse_stats().items()}
