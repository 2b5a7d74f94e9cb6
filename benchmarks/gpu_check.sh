#!/usr/bin/env bash
# The GPU checks in one call of at most ~8 minutes, for a session lent a device machine:
# bf16 training steps through the DeepSpeed engine with SDPA and (if importable) flash-attn,
# tokens/s, MFU and peak memory for MDLM small and tiny at L=1024, plus a forward check that
# bf16 logits stay close to fp32. Run from the repository root:
#   bash benchmarks/gpu_check.sh            (prints JSON lines; copies them to $OUT if set)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if ! "$PY" -c "import deepspeed, hydra, safetensors" 2>/dev/null; then
    "$PY" -m pip install -q -e . 2>&1 | tail -2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
log=${OUT:-/tmp}/gpu_check.jsonl
: > "$log"
run() { timeout 200 "$PY" "$@" 2>&1 | grep -v -i warn | tee -a "$log" | tail -4; }
run benchmarks/bench_train.py --models small,tiny --batch 8 --steps 5 --warmup 2 --attn sdpa
if "$PY" -c "import flash_attn" 2>/dev/null; then
    run benchmarks/bench_train.py --models small --batch 8 --steps 5 --warmup 2 --attn flash
else
    echo '{"bench": "train_step", "attn": "flash", "skipped": "flash_attn not importable"}' | tee -a "$log"
fi
timeout 120 "$PY" - <<'PY' 2>&1 | grep -v -i warn | tee -a "$log"
import json, torch
from model import Diffusion, ModelConfig
torch.manual_seed(0)
full = Diffusion(ModelConfig(autocast="off", dropout=0.0)).cuda().eval()
for p in full.parameters():
    torch.nn.init.normal_(p, std=0.02)
mixed = Diffusion(ModelConfig(autocast="bf16", dropout=0.0)).cuda().eval()
mixed.load_state_dict(full.state_dict())
x = torch.randint(0, 50257, (4, 1024), device="cuda")
with torch.no_grad():
    a, b = full.backbone(x), mixed.backbone(x)
print(json.dumps({"bench": "bf16_vs_fp32_logits", "max_abs": float((a - b).abs().max()),
                  "mean_abs": float((a - b).abs().mean()), "dtype": str(b.dtype)}))
PY
