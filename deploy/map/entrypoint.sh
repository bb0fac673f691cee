#!/bin/sh
# Entry point of the brainmirror MAP: raise the stack limit holoscan wants (32 MB; `docker run
# --ulimit stack=33554432` makes sure the hard limit allows it), then run the MONAI Deploy application
# with the MAP's HOLOSCAN_INPUT_PATH / HOLOSCAN_OUTPUT_PATH / HOLOSCAN_MODEL_PATH (or -i/-o/-m).
#
# Exit codes are app.py's: 0 assessed, 3 not assessed (an SR says why), 2 nothing to assess, 1 error.
# With BRAINMIRROR_METADATA_JSON set (MONAI Deploy Workflow Manager / Argo) it also writes the verdict
# as JSON ({"verdict": "abnormal|normal|not-assessed|error", "exit_code": N, "sr": ...}) to that file
# ("1": $HOLOSCAN_OUTPUT_PATH/metadata.json) and exits 0 for a not-assessed study too, so that the
# workflow can route on the verdict.
set -u
if ! ulimit -s 32768 2>/dev/null; then
  echo "brainmirror-map: cannot raise the stack limit to 32 MB (hard limit $(ulimit -H -s)); run with --ulimit stack=33554432" >&2
fi
app=/opt/holoscan/app/app.py
if [ -z "${BRAINMIRROR_METADATA_JSON:-}" ]; then
  exec python3 -u "$app" "$@"
fi
python3 -u "$app" "$@"
code=$?
metadata="$BRAINMIRROR_METADATA_JSON"
[ "$metadata" != 1 ] || metadata="${HOLOSCAN_OUTPUT_PATH}/metadata.json"
mkdir -p "$(dirname "$metadata")"
python3 /opt/holoscan/bin/sr_verdict.py --exit-code "$code" "${HOLOSCAN_OUTPUT_PATH}" > "$metadata" || exit 1
case "$code" in 0|3) exit 0 ;; *) exit "$code" ;; esac
