"""Run by test_fault_tolerance.py: ``tldr-rlhf ARGS...`` in a process of its own, with one fault:

- ``FAULT_KILL_IN_SAVE=N``: SIGKILL part-way through writing the N-th checkpoint (the first half of
  ``state.pt`` reaches the disk, then the process dies as under ``kill -9`` or a power cut);
- ``FAULT_CTRL_C_AFTER_SAVE=N``: Ctrl-C (KeyboardInterrupt) right after the N-th checkpoint;
- ``FAULT_FULL_DISK_AT_FINAL=1``: the disk fills up while the final model is written (its config
  reaches the disk, the weights raise ENOSPC); the checkpoints' weights before it are written."""

import io
import os
import signal
import sys

import torch

from tldr_rlhf import cli

kill_at = int(os.environ.get("FAULT_KILL_IN_SAVE", "0"))
if kill_at:
    real_save, calls = torch.save, [0]

    def save_then_die(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] < kill_at:
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        with open(f, "wb") as out:
            out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            out.flush()
            os.fsync(out.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save_then_die

ctrl_c_after = int(os.environ.get("FAULT_CTRL_C_AFTER_SAVE", "0"))
if ctrl_c_after:
    from tldr_rlhf.train import loop

    real_checkpoint, saved = loop.save_checkpoint, [0]

    def save_then_ctrl_c(*args, **kwargs):
        out = real_checkpoint(*args, **kwargs)
        saved[0] += 1
        if saved[0] == ctrl_c_after:
            raise KeyboardInterrupt
        return out

    loop.save_checkpoint = save_then_ctrl_c  # every stage checkpoints through loop.checkpoint_if_due

if os.environ.get("FAULT_FULL_DISK_AT_FINAL") == "1":
    import errno

    from transformers import PreTrainedModel

    real_save_pretrained = PreTrainedModel.save_pretrained

    def full_disk(self, path, *args, **kwargs):
        if os.path.basename(path) != ".final.tmp":  # each checkpoint saves its weights too; the disk fills at final/
            return real_save_pretrained(self, path, *args, **kwargs)
        os.makedirs(path, exist_ok=True)
        self.config.save_pretrained(path)
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(path, "model.safetensors"))

    PreTrainedModel.save_pretrained = full_disk

raise SystemExit(cli.main(sys.argv[1:]))
