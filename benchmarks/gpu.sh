#!/usr/bin/env bash
# The GPU half of the speed-and-memory benchmarks, in one call of a lent GPU machine.
#
# Here, once:  make gpu-wheels      (what the GPU image lacks, as wheels in .whl/, git-ignored)
# There:       bash benchmarks/gpu.sh            with the device tool's carry: [".whl"]
#
# The image there has torch, transformers, safetensors, numpy, Pillow, PyYAML and tqdm; it
# lacks diffusers (the reference) and PyAV, which text-to-video does not need. Results land in
# $OUT (the device tool's folder) or benchmarks/results: JSON + markdown naming the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
repeats=${REPEATS:-3}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/kinema-site .whl/*.whl
  export PYTHONPATH=/tmp/kinema-site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
# 1. the small shapes, fp32 and bf16: outputs equal to diffusers' on the GPU, ratios
python3 benchmarks/harness.py --configs kinema-tiny,small-wan --device cuda --dtype fp32 \
  --repeats "$repeats" --out "$out" --name gpu-fp32
# 2. Wan 2.1 1.3B at 480x832x81, bf16: DiT forward (eager and compiled) and MFU
python3 benchmarks/harness.py --configs wan2.1-1.3b --device cuda --dtype bf16 \
  --repeats "$repeats" --parts forward --compile --out "$out" --name gpu-bf16-wan1.3b-forward
# 3. the same shape end to end (50 steps) and the VAE decode: per step, peak memory
python3 benchmarks/harness.py --configs wan2.1-1.3b --device cuda --dtype bf16 \
  --repeats 1 --parts end_to_end,vae_decode --out "$out" --name gpu-bf16-wan1.3b
