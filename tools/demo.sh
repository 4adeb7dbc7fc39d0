#!/usr/bin/env bash
# make demo: the offline demo on real anatomy (CPU, minutes): pairs from the MNI152 templates in
# the nilearn wheel -> a short 3-D training run -> the paper's evaluation table and figure.
#   VPY   python to use (default .venv/bin/python)
#   DEMO  output folder, emptied first (default demo_out)
set -euo pipefail
cd "$(dirname "$0")/.."
VPY=${VPY:-.venv/bin/python}
DEMO=${DEMO:-demo_out}
"$VPY" -c "import nilearn" 2>/dev/null || "$VPY" -m pip install -q nilearn
rm -rf "$DEMO"
"$VPY" -m coopseg demo-data "$DEMO/data"
"$VPY" -m coopseg train --config configs/demo.yaml --out "$DEMO/run"
"$VPY" -m coopseg evaluate --manifest "$DEMO/data/test.csv" --checkpoint "$DEMO/run/last.pt" \
    --out "$DEMO/results.csv" --patch 64
