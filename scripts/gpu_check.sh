#!/usr/bin/env bash
# GPU acceptance check (issue 14 item 6), meant to finish in under 8 minutes on one H100 / H200:
#   1. a fresh venv with the CUDA extras (bitsandbytes) from the lock; torch 2.13.0 from PyPI is its CUDA build;
#   2. the gpu-marked tests (QLoRA, 8-bit AdamW, FSDP2 over NCCL on 1 GPU) and the bf16 tests, which run their CUDA path on a GPU
#      (KL exactly 0 and ratio exactly 1 at the first update with bf16 autocast);
#   3. a short bf16 pipeline on the real SmolLM2-135M (the cpu-smol preset in bfloat16 on the GPU);
#   4. tokens/s, model FLOPs utilization and peak memory per stage (scripts/gpu_summary.py).
# CI never has a GPU: nothing here is needed for `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-gpu}
RUN=${RUN:-/tmp/tldr-rlhf-gpu-check}
start=$(date +%s)
if [ ! -x "$VENV/bin/tldr-rlhf" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet -c constraints.txt torch==2.13.0
  "$VENV/bin/pip" install --quiet -c constraints.txt -e ".[test,cuda]"
fi
"$VENV/bin/python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('device:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
echo "== tests (gpu-marked, bf16 on CUDA) $(($(date +%s) - start)) s"
"$VENV/bin/python" -m pytest -q -m gpu -p no:cacheprovider tests
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_bf16.py tests/test_plan.py
echo "== bf16 pipeline on SmolLM2-135M $(($(date +%s) - start)) s"
rm -rf "$RUN"
"$VENV/bin/tldr-rlhf" pipeline --preset cpu-smol --run-dir "$RUN" \
  --sft.model.dtype bfloat16 --rm.model.dtype bfloat16 --dpo.dtype bfloat16 --ppo.dtype bfloat16 --grpo.dtype bfloat16 \
  --evaluate.dtype bfloat16 --sft.run.no-progress --rm.run.no-progress --dpo.run.no-progress --ppo.run.no-progress --grpo.run.no-progress
echo "== summary $(($(date +%s) - start)) s"
"$VENV/bin/python" scripts/gpu_summary.py "$RUN"
echo "gpu_check: done in $(($(date +%s) - start)) s"
