#!/usr/bin/env bash
# Installs detectron2 into the given Python environment unless a working
# install is already there (an upstream source install is used as is).
#
# Where upstream's repository cannot be reached, the package index's
# `pb1-detectron2==0.6` source archive (an upstream snapshot) is used. Its
# archive lacks detectron2's C++ sources, so it is built without its compiled
# ops; dcnv2_plugin._detectron2_compat handles that case at import time.
set -euo pipefail
PY=${1:-python}
VERSION=0.6
CACHE=.cache/detectron2

if "$PY" -c "import detectron2" 2>/dev/null; then
    echo "==> detectron2 already installed: $("$PY" -c 'import detectron2; print(detectron2.__version__)')"
    exit 0
fi

echo "==> installing detectron2 $VERSION from the pb1-detectron2 source archive (without its compiled ops)"
mkdir -p "$CACHE"
archive="$CACHE/pb1-detectron2-$VERSION.tar.gz"
if [ ! -f "$archive" ]; then
    # Reading the archive's metadata runs its setup.py, which imports torch:
    # hence no build isolation.
    "$PY" -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: \
        --no-build-isolation "pb1-detectron2==$VERSION" -d "$CACHE"
fi
src="$CACHE/src"
rm -rf "$src" && mkdir -p "$src"
tar xzf "$archive" -C "$src" --strip-components=1
# The archive has no detectron2/layers/csrc: build the Python package only.
sed -i 's/ext_modules=get_extensions(),/ext_modules=[],/' "$src/setup.py"
grep -q "ext_modules=\[\]," "$src/setup.py" || { echo "unexpected detectron2 setup.py layout" >&2; exit 1; }
"$PY" -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps "$src"
"$PY" -c "import detectron2; print('==> detectron2', detectron2.__version__, 'installed')"
