#!/usr/bin/env bash
# Instruction-tuning demo, the second stage after examples/cpt_demo.sh: the CPT run's adapter trained on
# the Italian Debian FAQ's questions and answers, on CPU. Prints one held-out question's greedy answer
# before and after, and the held-out loss on answers before and after (the trainer's eval rows).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
model=$(python3 examples/smollm2_path.py)
if [ ! -f runs/demo/cpt/latest ]; then
  echo "instruct demo: no CPT run in runs/demo/cpt; running the CPT demo first" >&2
  bash examples/cpt_demo.sh
fi
python3 examples/prepare_faq.py runs/demo/faq-train.jsonl runs/demo/faq-heldout.jsonl
question=$(python3 -c "import json; print(json.loads(open('runs/demo/faq-heldout.jsonl').readline())['instruction'])")
ask() {  # greedy, the question as one user message in SmolLM2's chat template
  python3 -m snuggle generate --model "$model" --adapter "$1" --max-new-tokens 80 --prompt "$question"
}
echo "held-out question: $question"
echo "--- before (the CPT adapter, runs/demo/cpt) ---"
ask runs/demo/cpt
rm -rf runs/demo/instruct  # a fresh run each time; use train.resume=true to continue one instead
python3 -m snuggle train examples/instruct_smollm2.yaml model.path="$model" "$@" \
  | tee runs/demo/instruct-summary.json
echo "--- after (instruction-tuned, runs/demo/instruct) ---"
ask runs/demo/instruct
echo "--- the FAQ's own answer ---"
python3 -c "import json; print(json.loads(open('runs/demo/faq-heldout.jsonl').readline())['output'])"
python3 - <<'PY'
import json
s = json.load(open("runs/demo/instruct-summary.json"))
print(f"held-out answer loss: {s['eval_loss_before']:.3f} before -> {s['eval_loss']:.3f} after "
      f"(perplexity {s['eval_ppl_before']:.2f} -> {s['eval_ppl']:.2f}; {s['steps']} steps; "
      f"loss curve: {s['output_dir']}/loss.png)")
PY
