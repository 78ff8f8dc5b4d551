#!/usr/bin/env bash
# Continued pretraining demo: SmolLM2-135M-Instruct on the Italian Debian Reference, on CPU.
# Prints held-out perplexity before and after training (rows never trained on).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
model=$(python3 examples/smollm2_path.py)
python3 examples/prepare_corpus.py runs/demo/corpus.jsonl
rm -rf runs/demo/cpt  # a fresh run each time; use train.resume=true to continue one instead
python3 -m snuggle train examples/cpt_smollm2.yaml model.path="$model" "$@" | tee runs/demo/summary.json
python3 - <<'PY'
import json
s = json.load(open("runs/demo/summary.json"))
print(f"held-out perplexity: {s['eval_ppl_before']:.2f} before -> {s['eval_ppl']:.2f} after "
      f"({s['steps']} steps; loss curve: {s['output_dir']}/loss.png)")
PY
python3 -m snuggle generate --model "$model" --adapter runs/demo/cpt --max-new-tokens 40 \
  --no-chat --prompt "Il comando apt-get serve per"
