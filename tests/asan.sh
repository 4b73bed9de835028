#!/usr/bin/env bash
# Run the op tests against an AddressSanitizer build of the extension.
#
# The editable install is left alone: a copy of the source tree (tracked and untracked,
# not ignored: no build/) is built with AGENTFORGE_SANITIZE=address into its own venv, and
# pytest runs from outside the repository so that `import agentforge` is the venv's copy.
#
#   tests/asan.sh                     # build, then run the op and fuzz tests
#   AF_ASAN_SKIP_BUILD=1 tests/asan.sh tests/test_pack.py -k roundtrip   # reuse the build
#
# Environment: AF_ASAN_DIR (default /tmp/af-asan), AF_ASAN_VENV (default /tmp/asan-venv),
# PYTHON (the interpreter whose torch, build tools and test packages are used, default python3;
# e.g. PYTHON=.venv/bin/python after `make install`).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${AF_ASAN_DIR:-/tmp/af-asan}
VENV=${AF_ASAN_VENV:-/tmp/asan-venv}
PY=${PYTHON:-python3}
# libstdc++ is preloaded with libasan: python itself does not link it, and when it is loaded
# later (with torch) ASan's __cxa_throw interceptor finds no real function and aborts with
# "CHECK failed: ... real___cxa_throw" at the first C++ exception (every TORCH_CHECK).
PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"

if [[ "${AF_ASAN_SKIP_BUILD:-0}" != 1 ]]; then
  rm -rf "$WORK"
  mkdir -p "$WORK/src"
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$WORK/src")

  [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
  SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # torch, the build tools and the test packages come from $PYTHON's environment (a venv
  # included, which --system-site-packages would not see); its .pth files are not run, so an
  # editable agentforge there stays out.
  "$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$SITE/zz-agentforge-base.pth"
  # The base interpreter may have agentforge installed editable (a meta-path finder from a
  # .pth file, plus the source dir on sys.path); both would win over the venv's own copy.
  # sitecustomize runs after the .pth files, so it can take them out again.
  cat > "$SITE/sitecustomize.py" <<EOF
# Written by agentforge tests/asan.sh: hide any other agentforge install from this venv.
import os, sys
sys.meta_path[:] = [f for f in sys.meta_path if "agentforge" not in getattr(f, "known_source_files", {})]
sys.path[:] = [p for p in sys.path
               if p == "$SITE" or not os.path.isfile(os.path.join(p or ".", "agentforge", "__init__.py"))]
EOF
  AGENTFORGE_SANITIZE=address AGENTFORGE_CUDA=OFF \
    "$VENV/bin/pip" install --no-build-isolation --no-deps --force-reinstall "$WORK/src"
fi

rm -rf "$WORK/run" && mkdir -p "$WORK/run"
cp -r "$REPO/tests" "$WORK/run/tests"
cd "$WORK/run"
# Reports go to files: ASan exits the process at once, so a report written to stderr inside
# a test would be lost in pytest's output capture. Leaks are off: CPython and torch hold
# allocations until exit by design.
REPORTS="$WORK/run/asan-report"
export LD_PRELOAD="$PRELOAD" ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0}:log_path=$REPORTS"

# Refuse to report a clean run of the wrong library.
"$VENV/bin/python" - "$VENV" <<'EOF'
import sys, agentforge, agentforge._C as C
assert C.__file__.startswith(sys.argv[1]), f"agentforge._C comes from {C.__file__}, not the ASan venv"
print("agentforge from", agentforge.__file__, "| _C from", C.__file__)
EOF

if [[ $# -eq 0 ]]; then
  set -- tests/test_quantize.py tests/test_pack.py tests/test_ternary_matmul.py tests/test_fake_quant.py \
         tests/test_bitlinear_op.py tests/test_bad_input.py tests/test_fuzz.py
fi
status=0
"$VENV/bin/python" -m pytest -p no:cacheprovider -q "$@" || status=$?
if compgen -G "$REPORTS.*" > /dev/null; then
  cat "$REPORTS".*
  echo "tests/asan.sh: AddressSanitizer reported the errors above (pytest exit status $status)" >&2
  exit 1
fi
echo "tests/asan.sh: no AddressSanitizer reports (pytest exit status $status)"
exit "$status"
