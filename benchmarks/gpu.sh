#!/usr/bin/env bash
# The GPU half of the speed-and-memory benchmarks and the GPU checks, in one call of a lent GPU.
#
# Here, once:  make gpu-wheels                       (diffusers etc. as wheels in .whl/)
#              python benchmarks/gpu_checks.py record  (.gpucheck/: the built-in model's CPU clips)
# There:       bash benchmarks/gpu.sh   with the device tool's carry: [".whl", ".gpucheck"]
#
# The image there has torch, transformers, safetensors, numpy, Pillow, PyYAML and tqdm; it lacks
# diffusers (the reference), PyAV and the MiniLM package. Stages run most important first, each
# under its own time limit, and every result so far is packed into $OUT/results.tar after each
# stage (the device tool brings back at most 8 files), so a call cut short still returns numbers.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
work=$(mktemp -d)
mkdir -p "$out"
exec > >(tee "$out/gpu-log.txt") 2>&1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/kinema-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/kinema-site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers; print(torch.__version__, diffusers.__version__)" || exit 1

stages=" ${STAGES:-forward sdpa e2e vae checks small compile} "  # STAGES="vae small": a rerun
stage() {  # stage SECONDS NAME COMMAND...: run, report, pack what there is
  local limit=$1 name=$2 start=$SECONDS
  shift 2
  [[ $stages == *" $name "* ]] || return 0
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@"
  echo "=== $name: rc $? in $((SECONDS - start)) s"
  tar -cf "$out/results.tar" -C "$work" .
}
harness=(python3 benchmarks/harness.py --out "$work")  # timeout runs programs, not functions

# 1. Wan 2.1 1.3B at 480x832x81, bf16: DiT forward (CFG batch of 2) and MFU
stage 150 forward "${harness[@]}" --configs wan2.1-1.3b --device cuda --dtype bf16 --repeats 3 \
  --parts forward --name gpu-bf16-wan1.3b-forward
# ... and with each of torch's attention kernels forced, in both libraries
stage 150 sdpa "${harness[@]}" --configs wan2.1-1.3b --device cuda --dtype bf16 --repeats 3 \
  --parts forward --sdpa cudnn,flash,efficient --name gpu-bf16-wan1.3b-sdpa
# 2. the same shape: time per denoising step (10 of the 50 steps) and peak memory; VAE decode
stage 120 e2e "${harness[@]}" --configs wan2.1-1.3b --device cuda --dtype bf16 --repeats 1 \
  --steps 10 --parts end_to_end --name gpu-bf16-wan1.3b-e2e
stage 150 vae "${harness[@]}" --configs wan2.1-1.3b --device cuda --dtype bf16 --repeats 1 \
  --parts vae_decode --decode-pieces 2,4 --name gpu-bf16-wan1.3b-vae
# 3. offload policies, bf16 training with checkpointing, the built-in model on the GPU, and
#    automatic decode tiling with the GPU's free memory
stage 200 checks python3 benchmarks/gpu_checks.py run --out "$work"
# 4. the small shapes in fp32: outputs equal to diffusers' on the GPU, ratios
stage 100 small "${harness[@]}" --configs kinema-tiny,small-wan --device cuda --dtype fp32 --repeats 3 \
  --name gpu-fp32
# 5. torch.compile of the 1.3B forward (regional: one block graph)
stage 150 compile "${harness[@]}" --configs wan2.1-1.3b --device cuda --dtype bf16 --repeats 3 \
  --parts forward --compile --name gpu-bf16-wan1.3b-compile
ls -la "$work"
