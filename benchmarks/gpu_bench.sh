#!/usr/bin/env bash
# The GPU table of README.md: bench_sd.py for SD 1.5 and SDXL shapes (random weights), full UNet and LoRA (rank 64),
# bf16, gradient checkpointing, batch 8 at 512 px (SD 1.5) and 4 at 1024 px (SDXL). Writes JSON + logs to $1.
# A GPU machine without diffusers: `pip download diffusers==0.42.1 peft==0.21.2 --no-deps -d wheels/` first.
set -u
out=${1:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ -d wheels ] && python -m pip install -q --no-deps --root-user-action=ignore wheels/*.whl 2>&1 | tail -1
python -c "import torch, diffusers, transformers, peft; print(torch.__version__, diffusers.__version__, transformers.__version__, peft.__version__, torch.cuda.get_device_name())"
for spec in ${SPECS:-"sd15-shapes" "sd15-shapes --lora" "sdxl-shapes --lora" "sdxl-shapes"}; do
  name=$(echo "$spec" | tr -d ' -' )
  echo "=== $spec"
  case $spec in sdxl*) lim=170;; *) lim=120;; esac
  timeout $lim python benchmarks/bench_sd.py --model $spec --gradient-checkpointing --reps 2 --warmup 1 --threads 8 \
    --json "$out/gpu_$name.json" > "$out/gpu_$name.log" 2>&1
  echo "exit $?"; grep -v "Loading\|Writing\|it/s\]" "$out/gpu_$name.log" | tail -14
done
