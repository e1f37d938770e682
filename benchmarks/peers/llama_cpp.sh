#!/usr/bin/env bash
# Build the llama.cpp peer baseline: llama-cpp-python from source in its own venv, flags recorded in build.json.
# Usage: benchmarks/peers/llama_cpp.sh   (re-running is a no-op once the same version and flags are built)
set -euo pipefail

VERSION=0.3.36
# CPU only, tuned for this machine as a user's own build would be; no libmtmd (multimodal, unused here).
CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF"
DIR="${EDGE_CACHE:-$HOME/.cache/gemma-edge}/peers/llama-cpp"
VENV="$DIR/venv"
PY="$VENV/bin/python"
export CMAKE_ARGS
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-1}"  # shared 2-core machines: raise it on your own

mkdir -p "$DIR"
[ -x "$PY" ] || python3 -m venv "$VENV"

if [ -f "$DIR/build.json" ] && "$PY" - "$DIR/build.json" "$VERSION" "$CMAKE_ARGS" <<'PYEOF'
import json, sys, importlib.metadata as md
b = json.load(open(sys.argv[1]))
ok = b["llama_cpp_python"] == sys.argv[2] == md.version("llama_cpp_python") and b["cmake_args"] == sys.argv[3]
sys.exit(0 if ok else 1)
PYEOF
then
    echo "llama-cpp-python $VERSION already built with: $CMAKE_ARGS ($DIR/build.json)"
    exit 0
fi

"$PY" -m pip install -q numpy psutil
echo "building llama-cpp-python $VERSION from source (CMAKE_ARGS=$CMAKE_ARGS); log: $DIR/build.log"
start=$(date +%s)
# --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS, so a wheel built with other flags could be reused.
if ! "$PY" -m pip install -v --no-cache-dir --force-reinstall --no-binary llama-cpp-python \
        "llama-cpp-python==$VERSION" >"$DIR/build.log" 2>&1; then
    grep -n -m5 -iE "error|fatal" "$DIR/build.log" >&2 || true
    echo "build failed; full log: $DIR/build.log" >&2
    exit 1
fi
secs=$(( $(date +%s) - start ))

"$PY" - "$DIR" "$CMAKE_ARGS" "$secs" "$(gcc --version | head -1)" <<'PYEOF'
import json, os, platform, re, sys, importlib.metadata as md
import llama_cpp
d, cmake_args, secs, gcc = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
log = open(os.path.join(d, "build.log"), errors="replace").read()
bt = re.search(r"CMAKE_BUILD_TYPE(?::\w+)?=(\w+)", log)
info = {
    "llama_cpp_python": md.version("llama_cpp_python"),
    "cmake_args": cmake_args,
    "build_type": bt.group(1) if bt else None,
    "compiler": gcc,
    "python": platform.python_version(),
    "machine": platform.machine(),
    "cmake_build_parallel_level": os.environ["CMAKE_BUILD_PARALLEL_LEVEL"],
    "build_seconds": secs,
    "system_info": llama_cpp.llama_print_system_info().decode(),
}
json.dump(info, open(os.path.join(d, "build.json"), "w"), indent=2)
print(json.dumps(info, indent=2))
PYEOF
