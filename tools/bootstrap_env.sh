#!/usr/bin/env bash
# Creates the project's virtual environment and installs the pinned
# requirements and detectron2. Safe to run again: pip skips what is there.
set -euo pipefail
VENV=${VENV:-.venv}
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
    echo "==> creating virtual environment $VENV"
    python3 -m venv "$VENV"
fi
echo "==> installing pinned requirements (first run downloads torch, several GB)"
"$PY" -m pip install --disable-pip-version-check -q -r requirements.txt
bash tools/install_detectron2.sh "$PY"
# Make the checkout importable from anywhere in this environment, as an
# editable install would, without building the extension twice.
site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$PWD" > "$site/dcnv2_plugin.pth"
