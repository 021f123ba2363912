"""Run by test_trust_round3b.py: ``tldr-rlhf ARGS...`` in a process of its own, where the disk fills up
while safetensors writes the final model's weights (``FAULT_SAFETENSORS_FULL_AT_FINAL=1``): safetensors'
own writer meets ENOSPC and raises its own error type (SafetensorError, not OSError), with the message
it gives for a real full disk; the checkpoints' weights before it are written."""

import os
import sys

import safetensors.torch
from safetensors import SafetensorError

from tldr_rlhf import cli

if os.environ.get("FAULT_SAFETENSORS_FULL_AT_FINAL") == "1":
    real_serialize = safetensors.torch.serialize_file  # what save_file (and so save_pretrained) calls

    def full_disk(tensors, filename, *args, **kwargs):
        if os.path.basename(os.path.dirname(str(filename))) == ".final.tmp":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_serialize(tensors, filename, *args, **kwargs)

    safetensors.torch.serialize_file = full_disk

raise SystemExit(cli.main(sys.argv[1:]))
