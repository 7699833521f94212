#!/usr/bin/env bash
# The GPU check of issue 13, as one prepared script that ends in under 8 minutes:
#   1. the CUDA-marked tests (tests/test_cuda.py) on the GPU;
#   2. scripts/bench_attribution.py for SmolLM2 (30 layers, the benchmark's random CLT, the
#      prompts "dallas" and "long33") on CUDA in float32, on CUDA in bfloat16, and on the CPU;
#   3. a training throughput run: `circuit-atlas transcoders train --device cuda` on a short
#      budget;
# and writes benchmarks/gpu.json (the card from torch.cuda.get_device_name, every step's exit
# status and wall time, the benchmark rows, training tokens/s, load averages).
#
#   scripts/device_check.sh --prepare   # here: put SmolLM2's config + tokenizer (3.5 MB) in
#                                       # .device_carry/ (git-ignored), to carry to the GPU machine
#   scripts/device_check.sh             # on the GPU machine (PYTHON=python3 there)
#   scripts/device_check.sh --dry-run   # anywhere: every step that needs no GPU, a 2-layer CPU
#                                       # benchmark, and the JSON written to $WORK only
#
# The real SmolLM2 weights (540 MB, or the 98 MB GGUF they are built from) do not fit in one
# device call (64 MiB), and the GPU machine reaches no package index. When the verified SmolLM2
# folder is not in the cache, the script builds a model with SmolLM2-135M-Instruct's exact
# config and tokenizer and random weights (seed 0): attribution and training cost depend on the
# shapes only, the CUDA tests compare the GPU with the CPU on the same weights, and gpu.json says
# which weights were used ("weights": "real" or "random").
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT:$ROOT/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
CARRY="$ROOT/.device_carry"
DRY=0
PREP=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        --prepare) PREP=1 ;;
        -h|--help) sed -n 2,24p "$0"; exit 0 ;;
        *) echo "device_check: unknown option $arg (use --prepare, --dry-run or none)" >&2; exit 2 ;;
    esac
done

say() { echo "[device_check $(date -u +%H:%M:%S)] $*" >&2; }

if [ "$PREP" = 1 ]; then
    "$PYTHON" - "$CARRY" <<'EOF' || exit 1
import shutil, sys
from pathlib import Path
from tracer.fetch import fetch_smollm2
src, dst = fetch_smollm2(verbose=False), Path(sys.argv[1]) / "smollm2-config"
dst.mkdir(parents=True, exist_ok=True)
for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "chat_template.jinja"):
    if (src / name).is_file():
        shutil.copy2(src / name, dst / name)
print(f"copied SmolLM2's config and tokenizer to {dst}")
EOF
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.device_carry/' "$exclude" 2>/dev/null || echo '/.device_carry/' >> "$exclude"
    echo "carry .device_carry in the device call; run: PYTHON=python3 scripts/device_check.sh"
    exit 0
fi

T0=$(date +%s)
WORK=${WORK:-$(mktemp -d /tmp/device_check.XXXXXX)}
mkdir -p "$WORK"
STEPS="$WORK/steps.tsv"
: > "$STEPS"
if [ "$DRY" = 1 ]; then OUT_JSON=${OUT_JSON:-$WORK/gpu.dry.json}; else OUT_JSON=${OUT_JSON:-benchmarks/gpu.json}; fi

# --- the GPU --------------------------------------------------------------------------------
if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    HAVE_CUDA=1
    say "GPU: $("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0), 'torch', torch.__version__)")"
else
    HAVE_CUDA=0
    msg="no CUDA GPU visible to torch ($("$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA build', torch.version.cuda)"))"
    if [ "$DRY" = 0 ]; then
        say "$msg: nothing to measure. Run this on a machine with a GPU (or --dry-run to check the script)."
        exit 3
    fi
    say "$msg; --dry-run: running the steps that need no GPU"
fi

# --- the model: the verified SmolLM2 cache, or its config with random weights ----------------
WEIGHTS=$("$PYTHON" - "$CARRY" "$WORK" <<'EOF'
import json, os, sys
from pathlib import Path
from tracer.fetch import MARKER, cache_root, is_verified

carry, work = Path(sys.argv[1]), Path(sys.argv[2])
if is_verified(cache_root() / "models" / "smollm2-135m-instruct"):
    print("real")
    sys.exit(0)
cfg = carry / "smollm2-config"
if not (cfg / "config.json").is_file():
    sys.exit(f"device_check: no verified SmolLM2 in {cache_root()} and no {cfg}: run "
             "scripts/device_check.sh --prepare where the cache is, and carry .device_carry")
import shutil
import torch
from transformers import AutoConfig, AutoModelForCausalLM
home = work / "home"
dest = home / "models" / "smollm2-135m-instruct"
dest.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg), dtype=torch.float32)
model.save_pretrained(dest, safe_serialization=True)
for f in cfg.iterdir():
    if f.name != "config.json":
        shutil.copy2(f, dest / f.name)
(dest / MARKER).write_text(json.dumps({
    "source": "random weights (seed 0) with SmolLM2-135M-Instruct's config and tokenizer, "
              "built by scripts/device_check.sh: the real weights do not fit in a device call",
    "weights_bytes": (dest / "model.safetensors").stat().st_size}))
print("random")
EOF
) || { say "could not prepare the model"; exit 1; }
if [ "$WEIGHTS" = random ]; then export CIRCUIT_ATLAS_HOME="$WORK/home"; fi
say "SmolLM2 weights: $WEIGHTS"

# step NAME SECONDS CMD...: run with a time limit, record exit status and wall seconds.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((470 - ($(date +%s) - T0)))
    if [ "$left" -lt 20 ]; then
        say "$name: skipped (the 8-minute budget is spent)"
        printf '%s\t%s\t%s\n' "$name" skipped 0 >> "$STEPS"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    say "$name (at most ${limit} s): $*"
    local s=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" > "$WORK/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - s))" >> "$STEPS"
    say "$name: exit $rc after $(($(date +%s) - s)) s (log $WORK/$name.log)"
    tail -n 3 "$WORK/$name.log" >&2
}

BENCH=(scripts/bench_attribution.py --skip-ct --work "$WORK/bench")
CORPUS_DIR="$WORK/corpus"
mkdir -p "$CORPUS_DIR"
cp README.md "$CORPUS_DIR/README.md"  # prose for a throughput run (text quality is irrelevant)

if [ "$HAVE_CUDA" = 1 ]; then
    step cuda_tests 100 "$PYTHON" -m pytest -q -m cuda tests/test_cuda.py -rs -p no:cacheprovider \
        --junitxml="$WORK/cuda_tests.xml"
    step bench_cuda_fp32 70 "$PYTHON" "${BENCH[@]}" --cases dallas,long33 --device cuda \
        --dtype float32 --threads 16 --out "$WORK/attr_cuda_fp32.json"
    step bench_cuda_bf16 60 "$PYTHON" "${BENCH[@]}" --cases dallas,long33 --device cuda \
        --dtype bfloat16 --threads 16 --out "$WORK/attr_cuda_bf16.json"
    step train_cuda 100 "$PYTHON" -m tracer transcoders train --device cuda --model smollm2 \
        --corpus "$CORPUS_DIR" --budget-minutes 1.2 --context-seqs 0 --heldout-seqs 4 \
        --batch-tokens 1024 --no-resume --out "$WORK/clt"
    step bench_cpu 130 "$PYTHON" "${BENCH[@]}" --cases dallas,long33 --device cpu \
        --threads 16 --out "$WORK/attr_cpu.json"
else
    step cuda_tests 100 "$PYTHON" -m pytest -q -m cuda tests/test_cuda.py -rs -p no:cacheprovider \
        --junitxml="$WORK/cuda_tests.xml"
    step bench_cpu 300 "$PYTHON" "${BENCH[@]}" --cases dallas --n-layers 2 --features 32 \
        --device cpu --threads 2 --out "$WORK/attr_cpu.json"
    step bench_cuda_fp32 30 "$PYTHON" "${BENCH[@]}" --cases dallas --device cuda \
        --out "$WORK/attr_cuda_fp32.json"
fi

# --- benchmarks/gpu.json ------------------------------------------------------------------------
"$PYTHON" - "$WORK" "$OUT_JSON" "$WEIGHTS" "$DRY" "$T0" <<'EOF'
import json, os, platform, sys, time
import xml.etree.ElementTree as ET
from pathlib import Path
import torch

work, out, weights, dry, t0 = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
steps = {}
for line in (work / "steps.tsv").read_text().splitlines():
    name, rc, wall = line.split("\t")
    steps[name] = {"exit": rc if rc == "skipped" else int(rc), "wall_s": int(wall),
                   "log_tail": (work / f"{name}.log").read_text()[-600:]
                   if (work / f"{name}.log").exists() else ""}
def bench(name):
    p = work / f"attr_{name}.json"
    if not p.exists():
        return None
    d = json.loads(p.read_text())
    return {"command": d["command"], "device": d.get("device"), "dtype": d.get("dtype"),
            "n_layers": d["n_layers"], "clt": d["clt"], "torch_threads": d["torch_threads"],
            "loadavg_start": d["loadavg_start"], "loadavg_end": d["loadavg_end"],
            "cases": [{"case": c["case"], "n_tokens": c["n_tokens"],
                       **{k: e.get(k) for k in ("wall_s", "load_s", "peak_rss_mb",
                          "peak_device_mb", "n_active_features", "n_nodes", "n_edges",
                          "timing_s")}}
                      for c in d["cases"] for e in c["engines"]]}
tests = None
if (work / "cuda_tests.xml").exists():
    s = ET.parse(work / "cuda_tests.xml").getroot()
    s = s if s.tag == "testsuite" else s.find("testsuite")
    tests = {k: int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
training = None
m = work / "clt" / "training_metrics.json"
if m.exists():
    d = json.loads(m.read_text())
    training = {k: d.get(k) for k in ("train_tokens_per_s", "harvest_tokens_per_s", "steps",
                                      "planned_steps", "wall_s", "nmse", "l0")}
cuda = torch.cuda.is_available()
doc = {
    "what": "issue 13 GPU check: CUDA tests, attribution on CUDA fp32 / bf16 and CPU, training",
    "command": "scripts/device_check.sh" + (" --dry-run" if dry == "1" else ""),
    "dry_run": dry == "1",
    "gpu": torch.cuda.get_device_name(0) if cuda else None,
    "torch": torch.__version__, "cuda": torch.version.cuda,
    "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    "loadavg_end": list(os.getloadavg()),
    "weights": weights,
    "total_wall_s": int(time.time()) - t0,
    "steps": steps, "cuda_tests": tests,
    "attribution": {k: bench(k) for k in ("cuda_fp32", "cuda_bf16", "cpu")},
    "training": training,
}
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(doc, indent=1))
print(f"wrote {out}")
EOF
say "done in $(($(date +%s) - T0)) s"
