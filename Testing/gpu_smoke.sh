#!/usr/bin/env bash
# GPU smoke check: segment a full-size phantom case (126 x 512 x 512) on CUDA with the demo bundle and
# print per-stage timings and peak GPU memory, then again with --low-memory (scores in CPU memory).
# Needs a CUDA build of torch; runs in well under 5 minutes.
#   bash Testing/gpu_smoke.sh [WORKDIR]
set -euo pipefail
work="${1:-$(mktemp -d)}"
python - <<'PY'
import torch, sys
if not torch.cuda.is_available():
    sys.exit("gpu_smoke: no CUDA device visible to torch " + torch.__version__)
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, {p.total_memory / 2**30:.1f} GiB; torch {torch.__version__}")
PY
start=$(date +%s)
segrap phantom --out "$work/phantom" --cases 1 --seed 99 --size full >/dev/null
case_dir="$work/phantom/SegRapPhantom_Set/segrap_0000"
segrap segment --ct "$case_dir/image.nii.gz" --contrast-ct "$case_dir/image_contrast.nii.gz" \
  --out "$work/out" --bundle demo --device cuda --json > "$work/events.jsonl"
end=$(date +%s)
segrap segment --ct "$case_dir/image.nii.gz" --contrast-ct "$case_dir/image_contrast.nii.gz" \
  --out "$work/out_low" --bundle demo --device cuda --low-memory --json > "$work/events_low.jsonl"
python - "$work/out/segrap_0000.provenance.json" "$work/out_low/segrap_0000.provenance.json" "$((end - start))" <<'PY'
import json, sys
for label, path in (("default", sys.argv[1]), ("--low-memory", sys.argv[2])):
    prov = json.load(open(path))
    print(f"[{label}] timings (s):", json.dumps(prov["timings_s"]))
    for task, rec in prov["inference"].items():
        print(f"[{label}] {task}: device {rec['device']}, folds {rec['folds']}, tiles {rec.get('tiles')}, "
              f"peak GPU memory {rec.get('peak_gpu_memory_gib')} GiB, low memory {rec.get('low_memory')}")
print(f"wall time of the default run including phantom generation: {sys.argv[3]} s")
PY
