#!/usr/bin/env bash
# Every check that needs a GPU, in one run, for a CUDA machine without internet (an H100/H200):
#   1. bf16 full fine-tuning moves the weights; compiled static-cache generation = eager loop (tests/gpu)
#   2. training throughput against TRL at the Qwen2.5-0.5B shape, batch 16 (+ prefix sharing on)
#   3. sampling throughput against one batched generate at batch 16/64/256
#   4. one iteration of configs/qwen2.5-0.5b-skywork.yaml on random weights: time and memory per stage
#   5. DeepSpeed ZeRO-3 in one process on the GPU trains what plain training does (tests/test_distributed.py)
#
# Bring along (folders git ignores): .whl/ with the wheels the machine lacks (trl, datasets, dill,
# multiprocess, pydantic, pydantic-core, annotated-types, typing-inspection, gguf; for step 5 deepspeed
# (`pip wheel --no-deps --no-build-isolation deepspeed==0.19.8`), hjson, py-cpuinfo, msgpack, einops,
# ninja) and .gpu/tokenizer
# (the SmolLM2 tokenizer, saved with save_pretrained). Logs go to $OUT (default: gpu-logs/).
# Each step has its own time limit, so one slow step cannot take the others' time.
set -u
OUT=${OUT:-gpu-logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 ILRDPO_QUIET=1 TOKENIZERS_PARALLELISM=false
export ILRDPO_TEST_TOKENIZER=$PWD/.gpu/tokenizer
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__,
'trl', trl.__version__)" | tee -a "$OUT/device.txt"

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    grep -v -e "Loading weights" -e "Warning" "$OUT/$name.log" | tail -n 25
    echo "=== $name: rc=$rc in $((SECONDS - start)) s"
}

step tests 120 python3 -m pytest tests/gpu -s -q -p no:cacheprovider
step train 150 python3 benchmarks/train_throughput.py --size 0.5b --device cuda --batch 16 --steps 10 --warmup 3
step train_prefix 60 python3 benchmarks/train_throughput.py --size 0.5b --device cuda --batch 16 --steps 10 \
    --warmup 3 --systems ilrdpo --prefix-sharing on
step generation 150 python3 benchmarks/generation_throughput.py --size 0.5b --tokenizer .gpu/tokenizer \
    --batch-sizes 16,64,256 --max-new-tokens 128 --no-generate-batch
step iteration 120 python3 benchmarks/gpu_iteration.py --tokenizer .gpu/tokenizer --out /tmp/gpu-iter
step zero 180 python3 -m pytest -q -p no:cacheprovider \
    "tests/test_distributed.py::test_deepspeed_trains_what_one_plain_process_trains[ZeRO-3 in one process]"
