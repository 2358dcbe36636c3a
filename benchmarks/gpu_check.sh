#!/usr/bin/env bash
# Issue 12's GPU acceptance in one call (planned for ~7 minutes on one H100/H200; the suite took
# about 4 there before; not yet run on a GPU):
#   1. the whole test suite with CUDA as the tests' device (PVAE_TEST_DEVICE=cuda);
#   2. bench_train.py --device cuda: pvae eager and captured vs plain PyTorch eager and captured;
#   3. bench_iwll.py --device cuda with default batch/chunk sizes: IW K = 5000 over all 10,000
#      Fashion-MNIST test images, against plain PyTorch;
#   4. the default VAE (784-400-50, batch 256) trained 10 epochs eagerly and captured as a CUDA
#      graph from the same seed: the two test ELBOs (nats per image) and their difference.
#
# On a machine without network, first bring pyro-ppl, arviz and the data as ../shared/GPU.md
# says (a .gpu folder in the repository root with whl/ and data/); the script installs them
# into /tmp/site when .gpu exists, and otherwise uses the Python environment it runs in.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # logs and metrics go to OUT_DIR (default
#                                                 # $OUT, else gpu-check/)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
py=${PYTHON:-python3}
if [ -d .gpu/whl ]; then
  $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD PVAE_DATA_DIR=$PWD/.gpu/data
fi
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME COMMAND...: run, log to $out/NAME.log, remember a failure
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$out/$name.log"
  echo "== $name: exit $rc, $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || status=1
}

$py -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
step suite env PVAE_TEST_DEVICE=cuda timeout 330 $py -m pytest -q -p no:cacheprovider -p no:benchmark -n 8 tests
step bench_train timeout 150 $py benchmarks/bench_train.py --device cuda --num-epochs 3
step bench_iwll timeout 60 $py benchmarks/bench_iwll.py --device cuda --num-test 10000 --num-samples 5000
for mode in off on; do
  rm -rf "$out/vae-graph-$mode"
  step "train_graph_$mode" timeout 120 $py -m pvae.cli train --dataset fashion-mnist --model vae \
    --latent-dim 50 --hidden-dims 400 --num-epochs 10 --batch-size 256 --device cuda \
    --cuda-graph "$mode" --seed 0 --no-progress --out "$out/vae-graph-$mode"
  step "evaluate_graph_$mode" timeout 60 $py -m pvae.cli evaluate "$out/vae-graph-$mode" \
    --num-samples 0 --num-test 0
done
$py - "$out" <<'EOF' || status=1
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
m = {k: json.loads((out / f"vae-graph-{k}" / "metrics.json").read_text()) for k in ("off", "on")}
for k, name in (("off", "eager"), ("on", "captured")):
    print(f"test ELBO after 10 epochs, {name:8s}: {m[k]['test_elbo']:.2f} "
          f"+- {m[k]['test_elbo_stderr']:.2f} nats per image")
diff = m["on"]["test_elbo"] - m["off"]["test_elbo"]
print(f"captured - eager: {diff:+.2f} nats (acceptance: within 0.5)")
EOF
exit $status
