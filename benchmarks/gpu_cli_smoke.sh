#!/usr/bin/env bash
# A new user's first hour on a GPU, in one call: the CLI end to end on one card, each step's exit
# status and last lines in $OUT/smoke.txt. The base is a random-init SmolLM2-135M-shaped Llama (30
# blocks, hidden 576, vocab 49152, tied embeddings) saved by transformers, with SmolLM2's tokenizer
# from TOK (a directory: `AutoTokenizer.from_pretrained(gguf dir, gguf_file=...).save_pretrained(TOK)`);
# the corpus is the shipped Italian Debian Reference. Steps: CPT (rsLoRA + trainable embeddings, bf16),
# resume to more steps, QLoRA (nf4), a long-context run under a small memory budget, the instruction
# stage from the CPT adapter, export hf / peft / gguf, eval of base + adapter against the merged model
# (and against transformers on the merged model), generate.
#
#   usage (repository root, GPU machine): OUT=/tmp/out TOK=runs/smoke/tok bash benchmarks/gpu_cli_smoke.sh
# The GPU image runs snuggle from src/ without installing it and lacks its dependency `gguf` (pure
# Python): EXTRA=DIR puts a folder holding the gguf package on PYTHONPATH (a copy of site-packages/gguf
# and its gguf-*.dist-info: transformers reads gguf's version). ONLY="cpt export_gguf eval_gguf": a subset.
set -uo pipefail
OUT=${OUT:?set OUT}
TOK=${TOK:?set TOK to a tokenizer directory}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD/src${EXTRA:+:$EXTRA}${PYTHONPATH:+:$PYTHONPATH}"
W=$(mktemp -d)
log="$OUT/smoke.txt"
step() {  # step NAME CMD...: run, record the exit status and the last lines
  local name=$1
  shift
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then
    return 0  # ONLY="cpt export_gguf ...": the steps to run (a step's inputs must be among them)
  fi
  local t0=$SECONDS
  "$@" > "$W/$name.out" 2> "$W/$name.err"
  local rc=$?
  {
    echo "=== $name: rc=$rc ($((SECONDS - t0)) s): $*"
    tail -n 4 "$W/$name.err" | tr '\r' '\n' | tail -n 4
    tail -n 6 "$W/$name.out"
  } >> "$log"
  return $rc
}
python3 - "$TOK" "$W/base" <<'PY'
import sys, torch, transformers
tok, out = sys.argv[1:]
cfg = transformers.LlamaConfig(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
    rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
)
torch.manual_seed(0)
transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
transformers.AutoTokenizer.from_pretrained(tok).save_pretrained(out)
PY
python3 examples/prepare_corpus.py "$W/corpus.jsonl"
python3 examples/prepare_faq.py "$W/faq-train.jsonl" "$W/faq-heldout.jsonl"
cat > "$W/cpt.yaml" <<EOF
model: {path: $W/base, dtype: bfloat16}
lora: {r: 64, alpha: 32, rslora: true, targets: all-linear, train_embeddings: true}
data: {train: $W/corpus.jsonl, seq_len: 1024, val_fraction: 0.02}
train: {steps: 30, batch_size: 8, lr: 5.0e-4, embedding_lr: 5.0e-5, warmup_steps: 3, eval_every: 10,
        save_every: 15, output_dir: $W/cpt, seed: 3407}
EOF
run() { python3 -m snuggle "$@"; }
step cpt run train "$W/cpt.yaml"
step resume run train "$W/cpt.yaml" train.steps=40 train.resume=true train.allow_config_change=true
step qlora run train "$W/cpt.yaml" model.quantize=nf4 train.steps=15 train.output_dir="$W/qlora"
step long run train "$W/cpt.yaml" data.seq_len=8192 train.batch_size=1 train.steps=6 \
  train.memory_budget_gib=3 train.output_dir="$W/long" train.eval_every=0
step instruct run train "$W/cpt.yaml" model.adapter="$W/cpt" data.train="$W/faq-train.jsonl" \
  data.format=instruct data.seq_len=1024 train.steps=15 train.batch_size=4 train.output_dir="$W/sft" \
  train.eval_every=0
step export_hf run export "$W/cpt" --format hf --out "$W/merged"
step export_peft run export "$W/cpt" --format peft --out "$W/peft"
step export_gguf run export "$W/cpt" --format gguf --out "$W/merged.gguf"
step export_qlora_hf run export "$W/qlora" --format hf --out "$W/qmerged"
step eval_adapter run eval --model "$W/base" --adapter "$W/cpt" --data "$W/faq-heldout.jsonl" --seq-len 512 --text-field output
step eval_peft run eval --model "$W/base" --adapter "$W/peft" --data "$W/faq-heldout.jsonl" --seq-len 512 --text-field output
step eval_merged run eval --model "$W/merged" --data "$W/faq-heldout.jsonl" --seq-len 512 --text-field output
step eval_gguf run eval --model "$W/merged.gguf" --data "$W/faq-heldout.jsonl" --seq-len 512 --text-field output
step eval_qmerged run eval --model "$W/qmerged" --data "$W/faq-heldout.jsonl" --seq-len 512 --text-field output
step generate run generate --model "$W/base" --adapter "$W/sft" --prompt "Che cos'è apt?" --max-new-tokens 16
step hf_parity python3 - "$W" <<'PY'
import json, sys, torch, transformers, peft
w = sys.argv[1]
tok = transformers.AutoTokenizer.from_pretrained(f"{w}/merged")
text = json.loads(open(f"{w}/faq-heldout.jsonl").readline())["output"]
ids = tok(text, return_tensors="pt").input_ids[:, :512].cuda()
m = transformers.AutoModelForCausalLM.from_pretrained(f"{w}/merged", dtype=torch.bfloat16).cuda()
base = transformers.AutoModelForCausalLM.from_pretrained(f"{w}/base", dtype=torch.bfloat16).cuda()
p = peft.PeftModel.from_pretrained(base, f"{w}/peft")
import snuggle
ours, _ = snuggle.load(f"{w}/merged", dtype=torch.bfloat16, device="cuda")
with torch.no_grad():
    lm, lp = (x(ids, labels=ids).loss.item() for x in (m, p))
    ref, got = m(ids).logits.float(), ours(ids).float()
diff = ((got - ref).abs().max() / ref.abs().max()).item()
print(json.dumps({"transformers_merged_loss": lm, "peft_loss": lp, "snuggle_vs_transformers_logits": diff}))
PY
for f in cpt resume qlora long instruct; do
  grep -h -i "memory plan\|predicted" "$W/$f.err" 2>/dev/null | tail -n 2 | sed "s/^/[$f] /" >> "$log"
done
python3 - "$W" >> "$log" <<'PY'
import json, sys
w = sys.argv[1]
for run in ("cpt", "qlora", "long", "sft"):
    try:
        rows = [json.loads(l) for l in open(f"{w}/{run}/metrics.jsonl")]
    except OSError as e:
        print(run, "no metrics", e)
        continue
    tr = [r for r in rows if "loss" in r]
    ev = [r for r in rows if "eval_loss" in r]
    print(run, "steps", len(tr), "loss", [round(r["loss"], 3) for r in tr[:: max(1, len(tr) // 6)]],
          "tok/s", round(tr[-1]["tokens_per_s"]), "mem", tr[-1]["mem_gib"],
          "eval", [round(r["eval_loss"], 3) for r in ev])
PY
ls "$W/cpt" >> "$log"
cat "$log"
