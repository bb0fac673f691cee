#!/usr/bin/env bash
# Set up, write the demo study (SYNTHETIC tumour in real Colin27 anatomy) as DICOM, run the
# MONAI Deploy application on it, and print the verdict and the DICOM SR it wrote.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
rm -rf demo/input demo/output
.venv/bin/python -m brainmirror demo-data demo/input --study "${1:-tumour}"
ulimit -s 32768 2>/dev/null || true  # holoscan wants a 32 MB stack
.venv/bin/python app.py -i demo/input -o demo/output -m models
echo
echo "== DICOM SR written by brainmirror (dsrdump, first lines of the study-level results) =="
dsrdump demo/output/SR_*.dcm 2>/dev/null | grep -E '"(Finding|Anomaly score|Anomaly score threshold|Study-level false positive rate|Volume)"' | head -8 || true
echo
echo "outputs in demo/output:"; ls demo/output
