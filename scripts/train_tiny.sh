#!/usr/bin/env bash
# Reproduce the built-in model kinema-tiny from scratch: stages 1-8 on a CPU (about 17 h on 2
# cores), stage 9 on a GPU:
#
#   1. the causal VAE in five stages (configs/kinema-tiny-vae{,-2,-3,-4,-5}.yaml): 64x64x9 crops,
#      then 32x32x5 crops at a higher learning rate (sharper), then whole 33-frame clips at
#      32x32 (the causal cache learns to stay stable over the default clip's 9 latent frames),
#      then the decoder alone (same encoder, same latents), on 32x32 and then 64x64 crops of
#      whole clips; each stage exports EMA weights +
#      per-channel latent mean/std (the first latent frame, one image encoded alone, gets its
#      own) -> runs/kinema-tiny-vae*/vae
#   2. the latents + caption tokens of the DiT's training clips, encoded once
#                                                  -> runs/kinema-tiny-dit/cache
#   3. the DiT on that cache, exported (EMA weights, fp16) with stage 5's VAE
#                                                  -> runs/kinema-tiny-dit/model
#   4. that DiT fine-tuned on 2048 fresh clips with 1.5x larger objects
#      (configs/kinema-tiny-dit-2.yaml; own cache)   -> runs/kinema-tiny-dit-2/model
#   5. and again on 2048 more fresh clips of that world
#      (configs/kinema-tiny-dit-3.yaml; own cache)   -> runs/kinema-tiny-dit-3/model
#   6. and once more on 2048 further fresh clips
#      (configs/kinema-tiny-dit-4.yaml; own cache)   -> runs/kinema-tiny-dit-4/model
#   7. and on 2048 further fresh clips mixed with the caches of stages 4-6 (8192 clips)
#      (configs/kinema-tiny-dit-5.yaml; extra_caches) -> runs/kinema-tiny-dit-5/model
#   8. and on 2048 further fresh clips mixed with the caches of stages 4-7 (10240 clips)
#      (configs/kinema-tiny-dit-6.yaml; extra_caches) -> runs/kinema-tiny-dit-6/model
#   9. on a GPU: 16384 further fresh clips, batch 64, bf16 (configs/kinema-tiny-dit-7.yaml;
#      ~8 min on an H200)                           -> src/kinema/assets/kinema-tiny
#      Without a GPU the script stops after stage 8 and says so.
#
# Resumable: every stage checkpoints (and saves on Ctrl-C / SIGTERM); running this script again
# continues where it stopped and skips finished stages. Delete runs/ to start over.
# Usage: scripts/train_tiny.sh            (from anywhere; uses .venv/bin/python if present)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3


for n in 1 2 3 4 5; do
  stage=$([ "$n" = 1 ] || echo "-$n")
  config=configs/kinema-tiny-vae$stage.yaml
  if [ -f "runs/kinema-tiny-vae$stage/vae/config.json" ]; then
    echo "[1/2] VAE stage $n already trained: runs/kinema-tiny-vae$stage/vae"
  else
    echo "[1/2] training the VAE, stage $n ($config)"
    "$PY" -c 'import sys; from kinema.train import load_vae_train_config, train_vae
train_vae(load_vae_train_config(sys.argv[1]))' "$config"
  fi
done

train_dit() {  # train_dit CONFIG: precompute its latents, then train (or resume) the DiT
  echo "[2/2] precomputing latents, then training the DiT ($1)"
  "$PY" -c 'import sys; from kinema.train import load_train_config, train_dit
print(train_dit(load_train_config(sys.argv[1])))' "$1"
}

for config in configs/kinema-tiny-dit.yaml configs/kinema-tiny-dit-2.yaml configs/kinema-tiny-dit-3.yaml \
  configs/kinema-tiny-dit-4.yaml configs/kinema-tiny-dit-5.yaml configs/kinema-tiny-dit-6.yaml; do
  train_dit "$config"
done

config=configs/kinema-tiny-dit-7.yaml
if "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  train_dit "$config"
else
  echo "stage 9 ($config) needs a CUDA GPU; the stage-8 weights are in runs/kinema-tiny-dit-6/model"
fi
