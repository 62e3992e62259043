#!/usr/bin/env bash
# Pretrain a tiny GPT on the built-in corpus (CPU, a few minutes), export it, sample from the export, and plot the loss.
# Extra arguments are config overrides for the training run, e.g. `bash examples/quickstart.sh operation.train_steps=100`.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ironcore train examples/pretrain.yaml --fresh "$@"
echo "--- a sample, drawn as the export's generation_config.json says (ironcore generate --greedy: greedy) ---"
ironcore generate runs/quickstart/export --prompt "The return value of" --max-new-tokens 40
echo "---"
ironcore plot runs/quickstart   # needs matplotlib: pip install -e '.[plot]'
