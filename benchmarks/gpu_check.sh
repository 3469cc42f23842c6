#!/usr/bin/env bash
# recaffe on a CUDA machine: one run that says whether GPU mode works, and how fast it is.
#
#   pip install -e '.[test]'
#   bash benchmarks/gpu_check.sh                 # on a machine with a CUDA GPU (sized for about 8 min on one H200; not yet run)
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # the same steps, small, on the CPU: checks this script
#
# Checks, in order (each with a time limit), then one summary table; the exit status is 1 when a
# check failed, 2 when no CUDA device is present (without --cpu-dry-run), 0 otherwise:
#   tests        RECAFFE_TEST_DEVICE=cuda pytest tests/layers tests/test_reference_cases.py
#   lenet        caffe train -gpu 0 on examples/mnist (LeNet, 2000 iterations): test accuracy >= 0.97
#   precision    caffe train -gpu 0 -precision bf16, then fp16 (LeNet, as above): test accuracy >= 0.97
#   determinism  two caffe train -gpu 0 -deterministic runs: the final .caffemodel files are identical
#   zoo          benchmarks/zoo_gpu_bench.py: zoo nets' forward, recaffe vs the plain torch module
#                (and caffe time -compile vs eager when the installed caffe has -compile)
#   multi_gpu    caffe train -gpu all, when several GPUs are present (else SKIP)
# Environment: GPU_CHECK_ONLY="lenet zoo" runs only those checks; GPU_CHECK_PYTEST_ARGS replaces the
# test selection; RECAFFE_SHARED points at ../shared (reference cases, zoo nets); GPU_CHECK_KEEP=1
# keeps the work folder (logs) and prints its path.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
  --cpu-dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--cpu-dry-run]" >&2; exit 64 ;;
esac

PY=${PYTHON:-python}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/recaffe-gpu-check.XXXXXX")
if [ "${GPU_CHECK_KEEP:-0}" = 1 ]; then echo "work folder: $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi
export GLOG_minloglevel=0

NGPU=$($PY -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
if [ "$DRY" = 1 ]; then
  DEVICE=cpu; GPU_FLAG=(); TEST_DEVICE=cpu
  LENET_ITERS=20; LENET_TEST_ITER=2; LENET_MIN_ACCURACY=0; DET_ITERS=5
  ZOO_ARGS=(--device cpu --batch 1 --iters 2 --nets squeezenet_v1.1 --no-compile)
  PYTEST_ARGS=${GPU_CHECK_PYTEST_ARGS:-"tests/layers/test_neuron.py tests/test_reference_cases.py -k relu"}
  LIMIT_TESTS=300; LIMIT_TRAIN=300; LIMIT_ZOO=300; MNIST_PARTS=(t10k:test)
else
  if [ "$NGPU" = 0 ]; then
    echo "gpu_check: no CUDA device is available to torch ($($PY -c 'import torch; print(torch.__version__, "CUDA build:", torch.version.cuda)' 2>&1));" \
         "run with --cpu-dry-run to check this script on the CPU" >&2
    exit 2
  fi
  DEVICE=cuda; GPU_FLAG=(-gpu 0); TEST_DEVICE=cuda
  LENET_ITERS=2000; LENET_TEST_ITER=20; LENET_MIN_ACCURACY=0.97; DET_ITERS=200
  ZOO_ARGS=(--device cuda --batch 32 --iters 20)
  PYTEST_ARGS=${GPU_CHECK_PYTEST_ARGS:-"tests/layers tests/test_reference_cases.py"}
  LIMIT_TESTS=240; LIMIT_TRAIN=120; LIMIT_ZOO=150; MNIST_PARTS=(train:train t10k:test)
fi

wanted() { [ -z "${GPU_CHECK_ONLY:-}" ] || [[ " $GPU_CHECK_ONLY " == *" $1 "* ]]; }

NAMES=(); STATUSES=(); SECONDS_=(); DETAILS=()
record() {  # name status seconds detail
  NAMES+=("$1"); STATUSES+=("$2"); SECONDS_+=("$3"); DETAILS+=("$4")
  printf '[gpu_check] %-12s %-4s %5ss  %s\n' "$1" "$2" "$3" "$4"
}

# run NAME LIMIT CMD...: runs CMD with a time limit, its output in $WORK/NAME.log; sets RC and ELAPSED.
run() {
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
  RC=$?
  ELAPSED=$((SECONDS - start))
  if [ "$RC" = 124 ]; then echo "timed out after ${limit}s" >>"$WORK/$name.log"; fi
}

last_line() { grep -v '^\s*$' "$1" | tail -n 1 | cut -c1-110; }

# ---------------------------------------------------------------------------------------- tests
if wanted tests; then
# shellcheck disable=SC2086  # PYTEST_ARGS is a list of words on purpose
run tests "$LIMIT_TESTS" env RECAFFE_TEST_DEVICE="$TEST_DEVICE" "$PY" -m pytest -q -p no:cacheprovider $PYTEST_ARGS
SUMMARY=$(grep -E '[0-9]+ (passed|failed|error)' "$WORK/tests.log" | tail -n 1)
if [ "$RC" = 0 ] && ! grep -q " skipped" <<<"$SUMMARY"; then
  record tests PASS "$ELAPSED" "$SUMMARY"
elif [ "$RC" = 0 ]; then  # skipped tests on the device mean the device was not used
  record tests FAIL "$ELAPSED" "tests were skipped: $SUMMARY"
else
  record tests FAIL "$ELAPSED" "${SUMMARY:-$(last_line "$WORK/tests.log")}"
fi
fi

# ---------------------------------------------------------------------------------------- lenet
mkdir -p "$WORK/mnist"
convert_ok=1
if wanted lenet || wanted precision || wanted determinism || wanted multi_gpu; then
# The dry run trains on the 2,000 test digits (one conversion fewer); a GPU run on the 8,000 training digits.
for part in "${MNIST_PARTS[@]}"; do
  run convert "$LIMIT_TRAIN" "$PY" -m recaffe.cli.main convert_mnist_data \
    "examples/mnist/data/${part%%:*}-images-idx3-ubyte.gz" "examples/mnist/data/${part%%:*}-labels-idx1-ubyte.gz" \
    "$WORK/mnist/mnist_${part##*:}_lmdb" --backend=lmdb || true
  [ "$RC" = 0 ] || convert_ok=0
done
if [ "$DRY" = 1 ] && [ "$convert_ok" = 1 ]; then ln -s mnist_test_lmdb "$WORK/mnist/mnist_train_lmdb"; fi
fi
sed -e "s#examples/mnist/mnist_#$WORK/mnist/mnist_#" examples/mnist/lenet_train_test.prototxt >"$WORK/lenet_train_test.prototxt"

solver() {  # solver ITERS PREFIX TEST_INTERVAL: a LeNet solver (Caffe's settings) in $WORK
  cat <<EOF
net: "$WORK/lenet_train_test.prototxt"
$([ "$3" -gt 0 ] && printf 'test_iter: %s\ntest_interval: %s' "$LENET_TEST_ITER" "$3")
base_lr: 0.01 momentum: 0.9 weight_decay: 0.0005
lr_policy: "inv" gamma: 0.0001 power: 0.75
display: 100
max_iter: $1
snapshot_prefix: "$2"
random_seed: 1
EOF
}

if ! wanted lenet; then
  :
elif [ "$convert_ok" = 0 ]; then
  record lenet FAIL 0 "convert_mnist_data failed: $(last_line "$WORK/convert.log")"
else
  solver "$LENET_ITERS" "$WORK/lenet" "$LENET_ITERS" >"$WORK/lenet_solver.prototxt"
  run lenet "$LIMIT_TRAIN" "$PY" -m recaffe.cli.main train -solver "$WORK/lenet_solver.prototxt" "${GPU_FLAG[@]}"
  ACC=$(grep -o 'Test net output #[0-9]*: accuracy = [0-9.e+-]*' "$WORK/lenet.log" | tail -n 1 | awk '{print $NF}')
  if [ "$RC" != 0 ] || ! grep -q "Optimization Done" "$WORK/lenet.log" || [ -z "$ACC" ]; then
    record lenet FAIL "$ELAPSED" "exit $RC: $(last_line "$WORK/lenet.log")"
  elif [ "$DRY" = 0 ] && ! grep -q "Use GPU with device ID 0" "$WORK/lenet.log"; then
    record lenet FAIL "$ELAPSED" "did not run in GPU mode"
  elif awk -v a="$ACC" -v m="$LENET_MIN_ACCURACY" 'BEGIN { exit !(a >= m) }'; then
    record lenet PASS "$ELAPSED" "$LENET_ITERS iterations on $DEVICE, test accuracy $ACC (>= $LENET_MIN_ACCURACY)"
  else
    record lenet FAIL "$ELAPSED" "test accuracy $ACC < $LENET_MIN_ACCURACY"
  fi
fi

# ------------------------------------------------------------------------------------ precision
if ! wanted precision; then
  :
elif [ "$convert_ok" = 0 ]; then
  record precision FAIL 0 "no MNIST LMDB (convert_mnist_data failed)"
else
  prec_ok=1; prec_elapsed=0; prec_detail=""
  for p in bf16 fp16; do
    mkdir -p "$WORK/$p"
    solver "$LENET_ITERS" "$WORK/$p/lenet" "$LENET_ITERS" >"$WORK/$p/solver.prototxt"
    run "precision_$p" "$LIMIT_TRAIN" "$PY" -m recaffe.cli.main train -solver "$WORK/$p/solver.prototxt" \
      "${GPU_FLAG[@]}" -precision "$p"
    prec_elapsed=$((prec_elapsed + ELAPSED))
    ACC=$(grep -o 'Test net output #[0-9]*: accuracy = [0-9.e+-]*' "$WORK/precision_$p.log" | tail -n 1 | awk '{print $NF}')
    if [ "$RC" != 0 ] || [ -z "$ACC" ] || ! grep -q "Mixed precision: " "$WORK/precision_$p.log"; then
      prec_ok=0; prec_detail="$prec_detail $p: exit $RC: $(last_line "$WORK/precision_$p.log");"
    elif awk -v a="$ACC" -v m="$LENET_MIN_ACCURACY" 'BEGIN { exit !(a >= m) }'; then
      prec_detail="$prec_detail $p $ACC;"
    else
      prec_ok=0; prec_detail="$prec_detail $p: accuracy $ACC < $LENET_MIN_ACCURACY;"
    fi
  done
  if [ "$prec_ok" = 1 ]; then
    record precision PASS "$prec_elapsed" "LeNet $LENET_ITERS iterations, test accuracy:$prec_detail"
  else
    record precision FAIL "$prec_elapsed" "$prec_detail"
  fi
fi

# ---------------------------------------------------------------------------------- determinism
if ! wanted determinism; then
  :
elif [ "$convert_ok" = 0 ]; then
  record determinism FAIL 0 "no MNIST LMDB (convert_mnist_data failed)"
else
  det_ok=1; det_elapsed=0
  for i in 1 2; do
    mkdir -p "$WORK/det$i"
    solver "$DET_ITERS" "$WORK/det$i/lenet" 0 >"$WORK/det$i/solver.prototxt"
    run "det$i" "$LIMIT_TRAIN" "$PY" -m recaffe.cli.main train -solver "$WORK/det$i/solver.prototxt" \
      "${GPU_FLAG[@]}" -deterministic
    det_elapsed=$((det_elapsed + ELAPSED))
    [ "$RC" = 0 ] || det_ok=0
  done
  M1="$WORK/det1/lenet_iter_$DET_ITERS.caffemodel"; M2="$WORK/det2/lenet_iter_$DET_ITERS.caffemodel"
  if [ "$det_ok" = 0 ] || [ ! -f "$M1" ] || [ ! -f "$M2" ]; then
    record determinism FAIL "$det_elapsed" "a run failed: $(last_line "$WORK/det1.log") / $(last_line "$WORK/det2.log")"
  elif cmp -s "$M1" "$M2"; then
    record determinism PASS "$det_elapsed" "2 runs of $DET_ITERS iterations: caffemodels identical ($(wc -c <"$M1") bytes)"
  else
    record determinism FAIL "$det_elapsed" "2 runs of $DET_ITERS iterations: the caffemodels differ"
  fi
fi

# ------------------------------------------------------------------------------------------ zoo
if ! wanted zoo; then
  :
else
run zoo "$LIMIT_ZOO" env GLOG_minloglevel=2 "$PY" benchmarks/zoo_gpu_bench.py "${ZOO_ARGS[@]}"
if [ "$RC" = 0 ]; then
  record zoo PASS "$ELAPSED" "$(grep -c 'x ' "$WORK/zoo.log") nets timed (table below)"
elif [ "$RC" = 2 ]; then
  record zoo SKIP "$ELAPSED" "$(last_line "$WORK/zoo.log")"
else
  record zoo FAIL "$ELAPSED" "$(grep -m1 FAILED "$WORK/zoo.log" || last_line "$WORK/zoo.log")"
fi
fi

# ------------------------------------------------------------------------------------ multi_gpu
if ! wanted multi_gpu; then
  :
elif [ "$DRY" = 1 ] || [ "$NGPU" -lt 2 ]; then
  record multi_gpu SKIP 0 "$NGPU GPU(s): -gpu all needs at least 2"
elif [ "$convert_ok" = 0 ]; then
  record multi_gpu FAIL 0 "no MNIST LMDB (convert_mnist_data failed)"
else
  mkdir -p "$WORK/multi"
  solver 200 "$WORK/multi/lenet" 200 >"$WORK/multi/solver.prototxt"
  run multi_gpu "$LIMIT_TRAIN" "$PY" -m recaffe.cli.main train -solver "$WORK/multi/solver.prototxt" -gpu all
  if [ "$RC" = 0 ] && [ -f "$WORK/multi/lenet_iter_200.caffemodel" ]; then
    record multi_gpu PASS "$ELAPSED" "-gpu all on $NGPU GPUs, 200 iterations: $(grep -o 'accuracy = [0-9.]*' "$WORK/multi_gpu.log" | tail -n 1)"
  else
    record multi_gpu FAIL "$ELAPSED" "exit $RC: $(last_line "$WORK/multi_gpu.log")"
  fi
fi

# -------------------------------------------------------------------------------------- summary
echo
if [ "$DRY" = 1 ]; then
  echo "recaffe gpu_check (CPU DRY RUN: plumbing only, says nothing about CUDA)"
else
  echo "recaffe gpu_check on $NGPU GPU(s): $($PY -c 'import torch; print(torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)')"
fi
printf '%-12s %-6s %7s  %s\n' check status seconds detail
failed=0
for i in "${!NAMES[@]}"; do
  printf '%-12s %-6s %7s  %s\n' "${NAMES[$i]}" "${STATUSES[$i]}" "${SECONDS_[$i]}" "${DETAILS[$i]}"
  [ "${STATUSES[$i]}" = FAIL ] && failed=1
done
if [ -s "$WORK/zoo.log" ]; then echo; cat "$WORK/zoo.log"; fi
if [ "$failed" = 1 ]; then
  echo; echo "gpu_check: FAILED (logs: rerun with GPU_CHECK_KEEP=1 to keep $WORK)"
  for i in "${!NAMES[@]}"; do
    if [ "${STATUSES[$i]}" = FAIL ] && [ -f "$WORK/${NAMES[$i]}.log" ]; then
      echo "--- last lines of ${NAMES[$i]}.log"; tail -n 15 "$WORK/${NAMES[$i]}.log"
    fi
  done
  exit 1
fi
echo; echo "gpu_check: all checks passed"
