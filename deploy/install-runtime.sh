#!/usr/bin/env sh
# Installs what `recserve serve` needs into one Python environment, and nothing else: recserve (built from
# SOURCE, not editable) with one ONNX Runtime, `cpu` (onnxruntime) or `gpu` (onnxruntime-gpu), at the
# versions pinned in SOURCE/constraints.txt. No torch, no transformers, no compilers.
#
# The Dockerfile's runtime stages call it, and tests/test_image.py runs it into a fresh virtual environment,
# serves a model from there and checks that torch cannot be imported: the image is proven by its parts.
#
# usage: deploy/install-runtime.sh cpu|gpu PYTHON [SOURCE]
#   PYTHON  the interpreter of the target environment (e.g. /opt/recserve/bin/python)
#   SOURCE  the recserve source tree (default: this script's repository); pip builds inside it
set -eu

usage() {
    echo "usage: $0 cpu|gpu PYTHON [SOURCE]" >&2
    exit 2
}

[ $# -ge 2 ] && [ $# -le 3 ] || usage
flavour=$1
python=$2
source=${3:-$(cd "$(dirname "$0")/.." && pwd)}
case $flavour in
    cpu | gpu) ;;
    *) usage ;;
esac

# NOTE: one pip command, so the resolver sees every pin at once; `-c` only bounds versions and installs
# nothing by itself.
"$python" -m pip install --quiet --no-warn-script-location \
    --constraint "$source/constraints.txt" "$source[$flavour]"

# On an NVIDIA CUDA base image (which sets CUDA_VERSION, and NV_CUDNN_VERSION for its cudnn flavour), refuse
# an onnxruntime-gpu built for another CUDA or cuDNN major: its CUDA provider would fail to load at start-up
# and the server would fall back to the CPU.
if [ "$flavour" = gpu ] && [ -n "${CUDA_VERSION:-}" ]; then
    "$python" - <<'PY'
import os
import re
import sys
from importlib.metadata import requires

from onnxruntime.capi.build_and_package_info import cuda_version as built_for

image = os.environ["CUDA_VERSION"]
major_minor = lambda v: tuple(int(p) for p in v.split(".")[:2])  # noqa: E731
# Minor-version compatibility: built with CUDA X.Y, it runs on any X.Z runtime with Z >= Y.
if major_minor(image)[0] != major_minor(built_for)[0] or major_minor(image) < major_minor(built_for):
    sys.exit(f"onnxruntime-gpu is built for CUDA {built_for}; this base image has CUDA {image}")
pins = [re.match(r"nvidia-cudnn-cu\d+~=(\d+)", r) for r in requires("onnxruntime-gpu") or []]
cudnn = [m.group(1) for m in pins if m]
image_cudnn = os.environ.get("NV_CUDNN_VERSION", "")
if cudnn and image_cudnn and image_cudnn.split(".")[0] != cudnn[0]:
    sys.exit(f"onnxruntime-gpu needs cuDNN {cudnn[0]}.x; this base image has cuDNN {image_cudnn}")
print(f"onnxruntime-gpu built for CUDA {built_for}, cuDNN {cudnn[0] if cudnn else '?'}.x: "
      f"matches the image's CUDA {image}, cuDNN {image_cudnn or '?'}")
PY
fi
