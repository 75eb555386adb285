#!/usr/bin/env bash
# The real-size GPU table (issue 19), prepared to run in one call on a CUDA machine: builds the DKFZ-size
# benchmark bundle (ResEnc L, poster's patch, 5 folds per task, random weights; ~5 GiB in WORKDIR), measures
# the candidate per-tile speed-ups (bench_network_variants.py, first call only), then ours vs stock nnU-Net on
# SegRap's median case (126 x 1024 x 1024 at 3 x 0.54 x 0.54 mm) for the mirroring given.
#   bash Testing/gpu_real_size.sh off [WORKDIR] [RESULTS_DIR]    # then, in a second call:
#   bash Testing/gpu_real_size.sh on  [WORKDIR] [RESULTS_DIR]
# Needs this project installed (pip install -e .) with a CUDA build of torch. Figures go to stdout and, as
# JSON, to RESULTS_DIR (default $OUT when set, else WORKDIR). See docs/performance.md.
set -euo pipefail
mirror="${1:-off}"
work="${2:-$(mktemp -d)}"
results="${3:-${OUT:-$work}}"
here="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$here/SegRapSegmenter${PYTHONPATH:+:$PYTHONPATH}"
python - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_real_size: no CUDA device visible to torch " + torch.__version__)
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, {p.total_memory / 2**30:.1f} GiB; torch {torch.__version__}", flush=True)
PY
mkdir -p "$work" "$results"
if [ ! -f "$work/bundle/segrap-model.json" ]; then
  python "$here/Testing/benchmarks/real_size_bundle.py" "$work/bundle" --folds 5 2>"$work/bundle.log"
fi
if [ "$mirror" = "off" ]; then
  timeout 240 python "$here/Testing/benchmarks/bench_network_variants.py" --bundle "$work/bundle" --device cuda \
    --repeats 5 | tee "$results/network_variants.txt" || echo "bench_network_variants did not finish (see above)"
fi
python "$here/Testing/benchmarks/bench_real_size.py" --bundle "$work/bundle" --device cuda --mirror "$mirror" \
  --work "$work/run_$mirror" --results "$results/real_size_mirror_$mirror.json"
rm -rf "$work/run_$mirror/home"  # the installed copy of the weights
