#!/usr/bin/env bash
# Run on a node before `ray start` (cluster/launcher/aws.yaml; the image has it as audiodiff-check-gpu): a GPU node
# whose driver or GPUs cannot run the image's torch stops here, naming what it found, instead of joining the
# cluster and failing later inside NCCL or `.to("cuda")` (torch.cuda.is_available() is just False there).
# The image's torch 2.11.0 is PyPI's CUDA 13.0 build (pinned with torchaudio 2.11.0 and torchvision 0.26.0, one set,
# as pyproject.toml pins them): it needs an NVIDIA driver of branch R580 or newer and a GPU of compute capability
# 7.5 or more (Turing, Ampere, Ada, Hopper, Blackwell; CUDA 13 no longer builds for Volta, 7.0, or older).
# A node without nvidia-smi is a CPU node: nothing to check.
set -euo pipefail
MIN_DRIVER=580
MIN_CAPABILITY=75  # 7.5

command -v nvidia-smi >/dev/null || exit 0
if ! found="$(nvidia-smi --query-gpu=index,name,driver_version,compute_cap --format=csv,noheader 2>&1)"; then
  echo "audiodiff-check-gpu: nvidia-smi fails on this node ($found): no usable NVIDIA driver" >&2
  exit 1
fi
status=0
while IFS=, read -r index name driver capability; do
  name="${name# }" driver="${driver# }" capability="${capability# }"
  echo "GPU $index: $name, driver $driver, compute capability $capability"
  if ((${driver%%.*} < MIN_DRIVER)); then
    echo "audiodiff-check-gpu: GPU $index: driver $driver is older than R$MIN_DRIVER, which torch 2.11's CUDA 13.0" \
      "build needs; use an image (AMI) with driver $MIN_DRIVER or newer" >&2
    status=1
  fi
  if ((${capability/./} < MIN_CAPABILITY)); then
    echo "audiodiff-check-gpu: GPU $index: $name (compute capability $capability) is not supported by CUDA 13.0;" \
      "use Turing (7.5) or newer" >&2
    status=1
  fi
done <<<"$found"
exit "$status"
