#!/usr/bin/env bash
# Reproduce the built-in model kinema-tiny from scratch on a CPU (about two hours on 2 cores):
#
#   1. the causal VAE on random 64x64x9 crops of synthetic clips, then its per-channel latent
#      mean/std                                    -> runs/kinema-tiny-vae/vae
#   2. the latents + caption tokens of the DiT's training clips, encoded once
#                                                  -> runs/kinema-tiny-dit/cache
#   3. the DiT on that cache, exported (EMA weights, fp16) -> src/kinema/assets/kinema-tiny
#
# Resumable: every stage checkpoints (and saves on Ctrl-C / SIGTERM); running this script again
# continues where it stopped and skips finished stages. Delete runs/ to start over.
# Usage: scripts/train_tiny.sh            (from anywhere; uses .venv/bin/python if present)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

VAE_CONFIG=configs/kinema-tiny-vae.yaml
DIT_CONFIG=configs/kinema-tiny-dit.yaml
VAE_OUT=runs/kinema-tiny-vae/vae

if [ -f "$VAE_OUT/config.json" ]; then
  echo "[1/2] VAE already trained: $VAE_OUT"
else
  echo "[1/2] training the VAE ($VAE_CONFIG)"
  "$PY" -c 'import sys; from kinema.train import load_vae_train_config, train_vae
train_vae(load_vae_train_config(sys.argv[1]))' "$VAE_CONFIG"
fi

echo "[2/2] precomputing latents, then training the DiT ($DIT_CONFIG)"
"$PY" -c 'import sys; from kinema.train import load_train_config, train_dit
print(train_dit(load_train_config(sys.argv[1])))' "$DIT_CONFIG"
