#!/usr/bin/env bash
# Installs detectron2 into the given Python environment unless one is already
# there (an upstream source install, with its compiled ops, is used as is).
#
# Where upstream's repository cannot be reached, the package index's
# `pb1-detectron2==0.6` source archive (an upstream snapshot) is used. Its
# archive lacks detectron2's C++ sources, so it is built without its compiled
# ops, and dcnv2_plugin's stand-in for them (dcnv2_plugin/_missing_detectron2_ops.py)
# is installed as detectron2/_C.py: detectron2 then imports in any order, and
# what needs the real ops raises an error that says how to get them.
set -euo pipefail
PY=${1:-python}
VERSION=0.6
CACHE=.cache/detectron2
STAND_IN=dcnv2_plugin/_missing_detectron2_ops.py

if "$PY" -c "import detectron2" 2>/dev/null; then
    echo "==> detectron2 already installed: $("$PY" -c 'import detectron2; print(detectron2.__version__)')"
    if ! "$PY" -W ignore -c "import detectron2._C" 2>/dev/null; then
        target=$("$PY" -c "import detectron2, os; print(os.path.dirname(detectron2.__file__))")/_C.py
        echo "==> it has no compiled ops: installing the stand-in $target"
        cp "$STAND_IN" "$target"
    fi
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
# The archive has no detectron2/layers/csrc: build the Python package only,
# with the stand-in in place of the compiled ops.
sed -i 's/ext_modules=get_extensions(),/ext_modules=[],/' "$src/setup.py"
grep -q "ext_modules=\[\]," "$src/setup.py" || { echo "unexpected detectron2 setup.py layout" >&2; exit 1; }
cp "$STAND_IN" "$src/detectron2/_C.py"
"$PY" -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps "$src"
"$PY" -W ignore -c "import detectron2, detectron2._C; print('==> detectron2', detectron2.__version__, 'installed')"
