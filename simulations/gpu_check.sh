#!/usr/bin/env bash
# GPU check of a paper-scale preset: DualLoRA on ViT-B/16 (duallora_cifar100_vitb16) on synthetic 224 px
# images, four clients sharing one GPU (ray.client_gpus=0.25) in bf16 (precision=auto).
#
#   bash simulations/gpu_check.sh
#
# Works on a fresh machine with a GPU, Python 3.10+ and torch, whose only network is PyPI: it makes a
# virtual environment that sees the machine's torch (--system-site-packages), pip-installs fedcl into it
# (flwr, ray, hydra, timm, ...; torch held at the installed version), and needs no hub weights and no data
# set (simulations/paper_scale.py writes random ViT-B/16 weights to a local file). Under 8 minutes on one
# H200: about 1-2 for the install, at most RUN_TIMEOUT_S (330) for the run.
#
# Prints, per phase, the mean client-round time of each part (model build, weights, training, bases,
# state, messages), GPU memory per client (torch.cuda.max_memory_allocated in each Ray worker, plus
# nvidia-smi sampling of the whole GPU and of each process), the bytes both ways, the server's round times,
# and throughput of the simulation against the same client rounds run one after another in one process.
# Files go to $OUT (or outputs/gpu_check/). GPU_CHECK_DRY_RUN=1 prints the commands and runs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${OUT:-outputs/gpu_check}
VENV=${GPU_CHECK_VENV:-.venv-gpu}
PYTHON=${PYTHON:-python3}
RUN_TIMEOUT_S=${RUN_TIMEOUT_S:-330}
# 2 tasks x 10 classes, 128 images per client per task, 2 rounds of 2 local epochs: 4,096 training images
RUN=(simulations/paper_scale.py --preset duallora_cifar100_vitb16 --tasks 2 --clients 4 --images 128 --rounds 2
     --infer-batch 32 --one-process --out "$OUT_DIR/run"
     ray.client_gpus=0.25 ray.client_cpus=2 precision=auto device=auto local_epochs=2 batch_size=64)

if [[ -n "${GPU_CHECK_DRY_RUN:-}" ]]; then
  echo "$PYTHON -m venv --system-site-packages $VENV"
  echo "$VENV/bin/python -m pip install -e . -c <(torch==<installed version>)"
  echo "timeout $RUN_TIMEOUT_S $VENV/bin/python ${RUN[*]}"
  exit 0
fi

mkdir -p "$OUT_DIR"
started=$(date +%s)
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no GPU visible to torch'
print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
# no venv module (Debian without python3-venv): install into the machine's own environment instead
if [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv --system-site-packages "$VENV"; then
  PY="$VENV/bin/python"
else
  PY="$PYTHON"
fi
# hold torch at the machine's version: pip then picks the torchvision built for it instead of a new torch
"$PY" -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' > "$OUT_DIR/constraints.txt"
"$PY" -m pip install -q -e . -c "$OUT_DIR/constraints.txt" || "$PY" -m pip install -q -e .
"$PY" -c "import torch, torchvision.ops, flwr, ray, hydra, timm; assert torch.cuda.is_available()"
echo "install: $(( $(date +%s) - started )) s"

# whole-GPU and per-process memory while the run goes (Ray workers are separate processes)
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader,nounits -lms 500 \
  > "$OUT_DIR/nvidia_smi_gpu.csv" &
SMI_GPU=$!
nvidia-smi --query-compute-apps=timestamp,pid,used_memory --format=csv,noheader,nounits -lms 1000 \
  > "$OUT_DIR/nvidia_smi_apps.csv" &
SMI_APPS=$!
trap 'kill $SMI_GPU $SMI_APPS 2>/dev/null || true' EXIT

export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 HF_HUB_OFFLINE=1
status=0
timeout "$RUN_TIMEOUT_S" "$PY" "${RUN[@]}" 2>&1 | tee "$OUT_DIR/paper_scale.log" || status=$?
kill $SMI_GPU $SMI_APPS 2>/dev/null || true
wait $SMI_GPU $SMI_APPS 2>/dev/null || true

echo
awk -F', ' '{ if ($2 > peak) peak = $2; util += $3; n++ }
  END { if (n) printf "nvidia-smi: GPU memory peak %d MiB, mean utilisation %.0f%% over %d samples\n",
                     peak, util / n, n }' \
  "$OUT_DIR/nvidia_smi_gpu.csv"
awk -F', ' '{ if ($3 > peak[$2]) peak[$2] = $3 }
  END { for (p in peak) printf "nvidia-smi: process %s peak %d MiB\n", p, peak[p] }' \
  "$OUT_DIR/nvidia_smi_apps.csv" | sort -k5 -n
echo "gpu_check: exit status $status, $(( $(date +%s) - started )) s in all; files in $OUT_DIR"
exit "$status"
