"""Print the verdict of the brainmirror SR in a folder as JSON (for workflow engines that route on it).

    python sr_verdict.py [--exit-code N] OUTPUT_DIR
    -> {"verdict": "abnormal" | "normal" | "not-assessed" | "error", "exit_code": N, "sr": "SR_....dcm"}

"error" when there is no brainmirror SR or its Finding is missing. Research use only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pydicom

from brainmirror.dicom import CODE_ABNORMAL, CODE_FINDING, CODE_NORMAL, CODE_NOT_ASSESSED

VERDICTS = {(c.value, c.scheme_designator): name for c, name in
            ((CODE_ABNORMAL, "abnormal"), (CODE_NORMAL, "normal"), (CODE_NOT_ASSESSED, "not-assessed"))}


def _code(item, keyword: str) -> tuple[str, str] | None:
    sequence = item.get(keyword)
    return (sequence[0].CodeValue, sequence[0].CodingSchemeDesignator) if sequence else None


def verdict(dataset: pydicom.Dataset) -> str | None:
    """The study-level Finding (DCM 121071) of a brainmirror TID 1500 SR."""
    stack = list(dataset.get("ContentSequence", []))
    while stack:
        item = stack.pop(0)
        if item.get("ValueType") == "CODE" and _code(item, "ConceptNameCodeSequence") == (
                CODE_FINDING.value, CODE_FINDING.scheme_designator):
            found = VERDICTS.get(_code(item, "ConceptCodeSequence"))
            if found:
                return found
        stack.extend(item.get("ContentSequence", []))
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--exit-code", type=int, default=None)
    args = parser.parse_args()
    result = {"verdict": "error", "exit_code": args.exit_code, "sr": None}
    for path in sorted(args.output_dir.glob("*.dcm")):
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        if dataset.get("Modality") == "SR" and dataset.get("Manufacturer") == "brainmirror":
            result.update(verdict=verdict(dataset) or "error", sr=path.name)
            break
    print(json.dumps(result))


if __name__ == "__main__":
    main()
