#!/usr/bin/env bash
# The whole offline pipeline on the built-in corpus (CPU): pretrain a tiny GPT -> export it as GPT-2 -> SFT from
# that export -> export -> DPO from the SFT export -> export -> a chat reply from the final model in plain
# transformers. Each stage prints one summary line on stdout; training logs go to stderr.
#   bash examples/pipeline.sh            (a few minutes on 2 cores)
#   bash examples/pipeline.sh --short    (a handful of steps per stage: checks the chain, learns little)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=runs/pipeline

steps() {  # overrides that cut a stage to $1 steps under --short, nothing otherwise
  if [[ "${1:-}" == "--short" ]]; then shift; else return 0; fi
  echo "operation.train_steps=$1 operation.eval_interval=$1 trainer.save_checkpoint_steps=$1 trainer.log_interval=5" \
       "operation.eval_samples=32 optim.warmup_steps=2"
}
SHORT="${1:-}"
[[ -z "$SHORT" || "$SHORT" == "--short" ]] || { echo "usage: bash examples/pipeline.sh [--short]" >&2; exit 2; }

summary() {  # STAGE RUN_DIR: first -> last train loss and the last eval figures, from the run's metrics.jsonl
  python - "$@" <<'PY'
import sys
from ironcore.plot import metrics_path, read_series

stage, run_dir = sys.argv[1:]
keys = ["loss", "eval/loss", "eval/perplexity", "eval/token_accuracy", "eval/reward_accuracy", "eval/reward_margin"]
series = read_series(metrics_path(run_dir), keys)
first, last = min(series["loss"]), max(series["loss"])
line = f"{stage}: train loss {series['loss'][first]:.3f} at step {first} -> {series['loss'][last]:.3f} at step {last}"
at = max(series["eval/loss"])
line += f"; eval at step {at}: " + ", ".join(
    f"{key[5:].replace('_', ' ')} {series[key][at]:.3f}" for key in keys[1:] if at in series[key])
print(line)
PY
}

stage() {  # NAME CONFIG N_SHORT_STEPS [overrides]: train, summarise, export as a native GPT-2 checkpoint
  local name=$1 config=$2 short_steps=$3; shift 3
  # shellcheck disable=SC2046  # the short-mode overrides are words
  ironcore train "$config" "trainer.model_path=$OUT/$name" $(steps $SHORT "$short_steps") "$@" --fresh >&2
  summary "$name" "$OUT/$name"
  ironcore export "$OUT/$name" --out "$OUT/$name-gpt2" --arch gpt2 >&2
  echo "export: $OUT/$name-gpt2 (GPT2LMHeadModel, loads with AutoModelForCausalLM)"
}

# examples/pipeline/sft.yaml starts from runs/pipeline/pretrain-gpt2, dpo.yaml from runs/pipeline/sft-gpt2
stage pretrain examples/pretrain.yaml 20 trainer.model_name=pipeline-pretrain
stage sft examples/pipeline/sft.yaml 10
# the short DPO scores its few pairs with the live reference instead of precomputing all 2.8k pairs first
stage dpo examples/pipeline/dpo.yaml 10 $([[ "$SHORT" == "--short" ]] && echo optim.dpo_precompute_ref=false)

python - "$OUT/dpo-gpt2" <<'PY'
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
question = "What does `json.dumps` do?"
prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)
torch.manual_seed(0)
with torch.no_grad():  # sampling as the export's generation_config.json says
    output = model.generate(**prompt, max_new_tokens=48)
reply = tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
print(f"chat: {question!r} -> {reply.strip()!r}")
PY
