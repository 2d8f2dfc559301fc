#!/usr/bin/env bash
# Build the OCI image localhost/dicom-tunnel:0.1.0 from this checkout (docs/packaging.md, devkit/image.py):
# a Debian bookworm minbase root from debootstrap, the product's wheels in /opt/dicom-tunnel/venv, user
# 10001, committed with buildah from scratch (no base image, no registry). As root, after scripts/bootstrap.sh.
#   deploy/image/build.sh [--tag localhost/dicom-tunnel:0.1.0] [--cache /var/cache/dicom-tunnel-image]
set -euo pipefail
ROOT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT_DIR"
exec "${VENV_DIR:-.venv}/bin/python" -m devkit.image build "$@"
