"""Write the MAP manifests app.json and pkg.json from app.yaml, as the Holoscan/MONAI Deploy packager does.

    python manifests.py APP_YAML OUT_DIR --models-dir /opt/holoscan/models [--gpu N] [--timeout S]

The layout and keys follow holoscan-cli's packager (holoscan_cli/packager: manifest_files.py,
config_reader.py, common/constants.py), so tools that read a packaged MAP's /etc/holoscan/*.json read
these. Needs PyYAML (the Dockerfile installs it in a throwaway folder for this step only).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

API_VERSION = "1.0.0"
APP_DIR = "/opt/holoscan/app"
MODELS_DIR = "/opt/holoscan/models"
WORK_DIR = "/var/holoscan"
CONFIG_PATH = "/var/holoscan/app.yaml"
DOCS_DIR = "/opt/holoscan/docs"
LOGS_DIR = "/var/holoscan/logs"
APP_MANIFEST = "/etc/holoscan/app.json"
PKG_MANIFEST = "/etc/holoscan/pkg.json"
COMMAND = ["/opt/holoscan/bin/brainmirror-map"]  # ulimit -s 32768, then python3 /opt/holoscan/app/app.py


def manifests(config: dict, models: list[str], sdk_version: str, gpu: int | None, timeout: int) -> tuple[dict, dict]:
    application, resources = config["application"], dict(config["resources"])
    if not application.get("title"):
        raise ValueError("app.yaml: application.title is missing")
    version = str(application["version"])
    if gpu is not None:
        resources["gpu"] = gpu
    if not resources.get("gpu"):
        resources.pop("gpuMemory", None)
    app = {
        "apiVersion": API_VERSION,
        "command": json.dumps(COMMAND),
        "environment": {
            "HOLOSCAN_APPLICATION": APP_DIR,
            "HOLOSCAN_INPUT_PATH": f"{WORK_DIR}/input",
            "HOLOSCAN_OUTPUT_PATH": f"{WORK_DIR}/output",
            "HOLOSCAN_WORKDIR": WORK_DIR,
            "HOLOSCAN_MODEL_PATH": MODELS_DIR,
            "HOLOSCAN_CONFIG_PATH": CONFIG_PATH,
            "HOLOSCAN_APP_MANIFEST_PATH": APP_MANIFEST,
            "HOLOSCAN_PKG_MANIFEST_PATH": PKG_MANIFEST,
            "HOLOSCAN_DOCS_PATH": DOCS_DIR,
            "HOLOSCAN_LOGS_PATH": LOGS_DIR,
        },
        "input": {"path": "input/", "formats": application.get("input-formats", application.get("inputFormats"))},
        "liveness": None,
        "output": {"path": "output/", "formats": application.get("output-formats", application.get("outputFormats"))},
        "readiness": None,
        "sdk": "monai-deploy",
        "sdkVersion": sdk_version,
        "timeout": timeout,
        "version": version,
        "workingDirectory": WORK_DIR,
    }
    pkg = {
        "apiVersion": API_VERSION,
        "applicationRoot": APP_DIR,
        "modelRoot": MODELS_DIR,
        "models": {name: f"{MODELS_DIR}/{name}" for name in models},
        "resources": resources,
        "version": version,
        "platformConfig": "dgpu" if resources.get("gpu") else "cpu",
    }
    return app, pkg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("app_yaml", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--models-dir", type=Path, required=True, help="the folder copied to /opt/holoscan/models")
    parser.add_argument("--sdk-version", required=True, help="monai-deploy-app-sdk version installed in the image")
    parser.add_argument("--gpu", type=int, default=None, help="GPUs the application wants (overrides app.yaml)")
    parser.add_argument("--timeout", type=int, default=0)
    args = parser.parse_args()
    config = yaml.safe_load(args.app_yaml.read_text())
    models = sorted(p.name for p in args.models_dir.iterdir() if p.is_dir())
    if not models:
        raise SystemExit(f"no model in {args.models_dir}")
    app, pkg = manifests(config, models, args.sdk_version, args.gpu, args.timeout)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "app.json").write_text(json.dumps(app, indent=2) + "\n")
    (args.out_dir / "pkg.json").write_text(json.dumps(pkg, indent=2) + "\n")
    print(json.dumps({"app.json": app, "pkg.json": pkg}, indent=2))


if __name__ == "__main__":
    main()
