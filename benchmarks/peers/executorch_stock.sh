#!/usr/bin/env bash
# Build the ExecuTorch stock peer: the 270M exported by optimum-executorch's own recipe (what its README tells
# users to run), in its own venv, from the same weights as our bundles; versions, command and cost in build.json.
# Usage: benchmarks/peers/executorch_stock.sh   (re-running is a no-op once the same versions have built the .pte)
# The export takes 8-17 min (with the host's load) and ~4.4 GB on a 2-core host: run it under nohup and poll.
set -euo pipefail

TORCH=2.13.0
EXECUTORCH=1.5.1
OPTIMUM_EXECUTORCH=1.1.0
OPTIMUM=2.0.0
TRANSFORMERS=5.0.0rc1  # optimum-executorch 1.1.0 pins it exactly
MAX_SEQ_LEN=1024       # as our bundles
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
EDGE_PY="${EDGE_PYTHON:-$ROOT/.venv/bin/python}"  # the project's venv: it reads the embedded weights
DIR="${EDGE_CACHE:-$HOME/.cache/gemma-edge}/peers/executorch-stock"
VENV="$DIR/venv"
PY="$VENV/bin/python"
HF="$DIR/hf"
PTE="$DIR/model.pte"
# The recipe of optimum-executorch's README for Gemma 3: 8da4w linears (group 32, its fixed default),
# 8-bit per-row embedding, its custom SDPA and KV cache ops.
EXPORT=(--task text-generation --recipe xnnpack --use_custom_sdpa --use_custom_kv_cache --qlinear 8da4w
        --qembedding 8w --max_seq_len "$MAX_SEQ_LEN")
CMD="optimum-cli export executorch --model <hf> ${EXPORT[*]} --output_dir <out>"
VERSIONS="torch=$TORCH executorch=$EXECUTORCH optimum-executorch=$OPTIMUM_EXECUTORCH optimum=$OPTIMUM"
VERSIONS+=" transformers=$TRANSFORMERS"

mkdir -p "$DIR"
[ -x "$PY" ] || python3 -m venv "$VENV"

if [ -f "$DIR/build.json" ] && [ -f "$PTE" ] && "$PY" - "$DIR/build.json" "$PTE" "$VERSIONS" "$CMD" <<'PYEOF'
import json, os, sys, importlib.metadata as md
b = json.load(open(sys.argv[1]))
want = dict(kv.split("=") for kv in sys.argv[3].split())
have = {k: md.version(k).split("+")[0] for k in want}
ok = b["versions"] == want == have and b["command"] == sys.argv[4] and b["pte_bytes"] == os.path.getsize(sys.argv[2])
sys.exit(0 if ok else 1)
PYEOF
then
    echo "ExecuTorch stock peer already built with $VERSIONS: $PTE ($DIR/build.json)"
    exit 0
fi

# torch first and pinned, and held there by a constraint: a package that asked for another torch would
# otherwise pull a CUDA build (GBs); with the pin pip fails instead.
echo "torch==$TORCH" >"$DIR/constraints.txt"
PIP=("$PY" -m pip install -q -c "$DIR/constraints.txt")
"${PIP[@]}" "torch==$TORCH"
"${PIP[@]}" "executorch==$EXECUTORCH" "optimum==$OPTIMUM" "transformers==$TRANSFORMERS" \
    "optimum-executorch==$OPTIMUM_EXECUTORCH" accelerate==1.16.0 psutil==7.2.2 numpy==2.4.6
"$PY" -m pip check

# The same weights as our bundles (the embedded GGUF, dequantized to fp32) under transformers' names,
# by the map the validator's reference stage uses (edge/models/weights/hf.py).
if [ ! -f "$HF/model.safetensors" ]; then
    echo "writing the embedded 270M as a Hugging Face folder: $HF"
    "$EDGE_PY" - "$ROOT" "$HF" <<'PYEOF'
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from safetensors.torch import save_file
from edge.models.loading import load_weights
from edge.models.variants import get_variant
from edge.models.weights.hf import config_to_hf, to_hf_state_dict

out = Path(sys.argv[2])
tmp = out.with_name(out.name + ".tmp")
tmp.mkdir(parents=True, exist_ok=True)
loaded = load_weights(get_variant("270m"), None, False, 0)
cfg = {"architectures": ["Gemma3ForCausalLM"], **config_to_hf(loaded.config), "torch_dtype": "float32"}
(tmp / "config.json").write_text(json.dumps(cfg, indent=1))
# Tied head: no lm_head.weight (safetensors refuses shared tensors; transformers ties it on load).
state = {k: v.contiguous() for k, v in to_hf_state_dict(loaded.config, loaded.tensors).items()}
save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
(tmp / "source.json").write_text(json.dumps(loaded.source, indent=1))
tmp.rename(out)
PYEOF
fi
# transformers $TRANSFORMERS must load every tensor by name: a missing one would be exported as random init.
"$PY" - "$HF" <<'PYEOF'
import sys
from transformers import AutoModelForCausalLM
from transformers.utils import logging
logging.disable_progress_bar()
_, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], output_loading_info=True)
bad = {k: v for k, v in info.items() if v}
sys.exit(f"the HF folder does not load cleanly: {bad}" if bad else 0)
PYEOF

echo "exporting with optimum-executorch $OPTIMUM_EXECUTORCH (8-17 min, ~4.4 GB); log: $DIR/export.log"
rm -rf "$DIR/out.tmp" && mkdir -p "$DIR/out.tmp"
start=$(date +%s)
if ! /usr/bin/time -v -o "$DIR/export.time" "$VENV/bin/optimum-cli" export executorch --model "$HF" "${EXPORT[@]}" \
        --output_dir "$DIR/out.tmp" >"$DIR/export.log" 2>&1; then
    tail -n 20 "$DIR/export.log" >&2
    echo "export failed; full log: $DIR/export.log" >&2
    exit 1
fi
secs=$(( $(date +%s) - start ))
mv "$DIR/out.tmp/model.pte" "$PTE"

"$PY" - "$DIR" "$VERSIONS" "$CMD" "$secs" <<'PYEOF'
import hashlib, json, os, platform, re, sys, importlib.metadata as md
d, versions, cmd, secs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
timing = open(os.path.join(d, "export.time")).read()
rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", timing).group(1))
pte = os.path.join(d, "model.pte")
info = {
    "versions": {k: md.version(k).split("+")[0] for k in dict(kv.split("=") for kv in versions.split())},
    "torchao": md.version("torchao"),
    "command": cmd,
    "source": json.load(open(os.path.join(d, "hf", "source.json"))),
    "export_seconds": secs,
    "export_peak_rss_mb": round(rss_kib / 1024),
    "pte_bytes": os.path.getsize(pte),
    "pte_sha256": hashlib.sha256(open(pte, "rb").read()).hexdigest(),
    "python": platform.python_version(),
    "machine": platform.machine(),
    "cores": os.cpu_count(),
}
json.dump(info, open(os.path.join(d, "build.json"), "w"), indent=2)
print(json.dumps(info, indent=2))
PYEOF
rm -rf "$DIR/out.tmp"
