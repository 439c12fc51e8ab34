#!/usr/bin/env bash
# The first thing to run whenever a GPU is at hand, as one command: the GPU tests on the GPU, then the README's
# benchmark commands in the order of what the README lacks most, each bounded so that a short loan of a GPU
# still brings back the first results. Logs and tables go to $OUT (default: gpu_session/).
#
#     bash tests/gpu_session.sh                      # on the GPU machine, from the repository root
#     DEVICE=cpu QUICK=1 bash tests/gpu_session.sh   # a dry run of this script on a CPU (tiny sizes)
#
# BUDGET (seconds, default 540) bounds the whole; a step that would start with less than a minute left is skipped.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-gpu_session}
device=${DEVICE:-cuda}
budget=${BUDGET:-540}
quick=${QUICK:+--quick}
data=${DATA_ROOT:-/tmp/seg_benchmark_data}
mkdir -p "$out"
start=$(date +%s)

step() {    # step NAME SECONDS COMMAND...: runs COMMAND with at most SECONDS (or what is left), logs to $out/NAME.log
    local name=$1 limit=$2
    shift 2
    local left=$((budget - ($(date +%s) - start)))
    if [ "$left" -lt 60 ]; then
        echo "$name: skipped, ${left} s left of ${budget}" | tee -a "$out/summary.txt"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$(date +%s)
    timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $(($(date +%s) - t0)) s (limit $limit s): $*" | tee -a "$out/summary.txt"
    tail -n 5 "$out/$name.log"
}

{ nvidia-smi 2>&1 || true; python -c 'import torch, torchvision, platform; print(platform.platform(), "python",
  platform.python_version(), "torch", torch.__version__, "torchvision", torchvision.__version__, "cuda",
  torch.version.cuda, [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])'; } \
  > "$out/machine.txt" 2>&1
cat "$out/machine.txt"
gpu_tests=(python -m pytest -q -rs tests/test_gpu_path.py tests/test_device_audit.py)
[ "$device" = cuda ] && gpu_tests+=(--device cuda)
step gpu_tests 240 "${gpu_tests[@]}"
step train_infer 180 python tests/benchmark.py --device "$device" $quick --parts train infer --out "$out/train_infer.md"
step recipe 420 python tests/benchmark.py --device "$device" $quick --data-root "$data" --parts recipe \
    --configs defaults --out "$out/recipe.md"
step accuracy 300 python tests/benchmark.py --device "$device" $quick --parts accuracy --out "$out/accuracy.md"
step full_suite 300 python -m pytest -q tests $([ "$device" = cuda ] && echo --device cuda)
echo "done in $(($(date +%s) - start)) s; logs and tables in $out/"
