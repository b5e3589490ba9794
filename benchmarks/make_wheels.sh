#!/usr/bin/env bash
# Download into .whl/ the wheels the GPU machines lack, for Python 3.12 on x86-64 Linux.
#
#   bash benchmarks/make_wheels.sh          # then carry ".whl" with the device call
#
# The GPU image (see /work/.library/device/KINDS.md) already has torch 2.11, triton 3.6,
# transformers 5.17, safetensors 0.8, accelerate, pandas, pyarrow, huggingface-hub, xxhash,
# fsspec, peft, scipy, sentencepiece, protobuf, click, pyyaml, tqdm, psutil, tensorboard,
# matplotlib and has no network. What it lacks, and who needs it:
#   liger-kernel                 peer kernels (FLCE, fused linear DPO)          -- no deps beyond torch/triton
#   trl                          peer DPO utilities                              -- needs datasets
#   datasets, dill, multiprocess our own dependency (r7b_fast.data.sources)
#   mergekit, pydantic, pydantic-core, annotated-types, typing-inspection, immutables
#                                merge benchmark's peer
#   setuptools                   building r7b-fast without build isolation: its PEP 639 license
#                                metadata needs setuptools >= 77 (the image's may be older)
# One version of each (two stop the install); versions match this machine's .venv so the CPU
# dry-run exercises the same peer code. gpu_suite.sh installs them with
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl ; export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  liger-kernel==0.8.5
  trl==1.16.0
  datasets==5.2.0
  dill==0.4.1
  multiprocess==0.70.19
  mergekit==0.1.5
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  immutables==0.21
  setuptools==84.2.1
)

grep -qx '/.whl/' .git/info/exclude 2>/dev/null || grep -qx '/.whl/' .gitignore ||
  echo '/.whl/' >>.git/info/exclude
mkdir -p .whl
PY=${PYTHON:-python3}
for spec in "${WHEELS[@]}"; do
  name=${spec%%==*}
  stem=$(echo "$name" | tr '-' '_')
  if ls .whl/"${stem}"-"${spec##*==}"-*.whl >/dev/null 2>&1; then
    continue
  fi
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "$spec"
done
# Exactly one version per package: a stale older wheel left in .whl/ would break the install.
dups=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dups" ]; then
  echo "make_wheels: several versions of: $dups (delete the stale ones from .whl/)" >&2
  exit 1
fi
du -sh .whl
ls .whl
