#!/usr/bin/env bash
# The Elastic Reasoning result in miniature, on CPU (about 35 minutes on 2 cores):
#
#   1. traces: two-digit additions with long step-by-step thinking (a line per digit, the sum,
#      then a second pass in the other order that re-checks it: about 150 thinking tokens, the
#      answer known after about 78 of them);
#   2. SFT: the embedded SmolLM2-135M-Instruct learns to write those traces;
#   3. budget-constrained GRPO from the SFT model: every rollout thinks for at most T_STAR tokens,
#      the end-of-thinking marker is forced there, and the solution gets S_STAR tokens
#      (T_STAR lands in the re-check, so a forced end cuts the thinking after the answer was found
#      but before the model restates it);
#   4. both checkpoints evaluated at several thinking budgets (accuracy, majority vote, tokens).
#
# Run from the repository root after `make setup`:  bash benchmarks/e1_miniature.sh
# Every setting below can be overridden from the environment (OUT=runs/e1-big STEPS=60 ...).
# Results: $OUT/eval/results.csv and accuracy_vs_tokens.png; the committed copy is in
# docs/e1-miniature/ and benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/e1}
DIGITS=${DIGITS:-2}
TRACES=${TRACES:-400}
SFT_EPOCHS=${SFT_EPOCHS:-1}
SFT_LR=${SFT_LR:-1e-4}
T_STAR=${T_STAR:-96}
S_STAR=${S_STAR:-16}
STEPS=${STEPS:-20}
GROUP=${GROUP:-8}
PROMPTS=${PROMPTS:-4}
GRPO_LR=${GRPO_LR:-3e-5}
GRPO_TEMPERATURE=${GRPO_TEMPERATURE:-1.0}
KL_COEF=${KL_COEF:-0}  # the paper's recipe: 0.001 (with GRPO_TEMPERATURE=0.6)
SFT_CKPT=${SFT_CKPT:-}  # an SFT checkpoint of an earlier run: skip stages 1-2 and start GRPO from it
EVAL_SFT=${EVAL_SFT:-1}  # 0: evaluate the GRPO checkpoint alone (its SFT start was evaluated before)
BUDGETS=${BUDGETS:-0,64,80,96,112,128,none}
PROBLEMS=${PROBLEMS:-32}
SAMPLES=${SAMPLES:-4}
TASK="arithmetic:${DIGITS}:+"

if [ ! -x "$PY" ]; then
    echo "error: $PY not found: run 'make setup' first (or set PY=/path/to/python)" >&2
    exit 2
fi
mkdir -p "$OUT"
start=$(date +%s)
stage() { echo; echo "=== $1 ($(( $(date +%s) - start )) s so far)"; }

if [ -z "$SFT_CKPT" ]; then
    stage "1/4 traces"
    "$PY" -m elastic_decode.train.traces --digits "$DIGITS" --check --count "$TRACES" --seed 1 \
        --output "$OUT/traces.jsonl"

    stage "2/4 SFT on the traces"
    "$PY" -m elastic_decode.train --mode sft --sft-data "$OUT/traces.jsonl" --epochs "$SFT_EPOCHS" \
        --batch-size 8 --micro-batch-size 8 --learning-rate "$SFT_LR" --no-gradient-checkpointing \
        --output-dir "$OUT/sft" --overwrite
    SFT_CKPT=$(ls -d "$OUT"/sft/checkpoint-* | sort -t- -k2 -n | tail -1)
elif [ ! -d "$SFT_CKPT" ]; then
    echo "error: SFT_CKPT=$SFT_CKPT is not a directory (a checkpoint-N folder of an earlier run)" >&2
    exit 2
fi

stage "3/4 budget-constrained GRPO from $SFT_CKPT (t* = $T_STAR, s* = $S_STAR)"
"$PY" -m elastic_decode.train --model "$SFT_CKPT" --task "$TASK" --steps "$STEPS" \
    --group-size "$GROUP" --prompts-per-step "$PROMPTS" --think-budget "$T_STAR" \
    --solution-budget "$S_STAR" --temperature "$GRPO_TEMPERATURE" --learning-rate "$GRPO_LR" \
    --kl-coef "$KL_COEF" --format-reward-weight 0 --no-gradient-checkpointing --output-dir "$OUT/grpo" --overwrite
GRPO_CKPT="$OUT/grpo/checkpoint-$STEPS"

stage "4/4 evaluation at thinking budgets $BUDGETS"
LABEL="SFT + budget GRPO (t*=$T_STAR)"
if [ "$KL_COEF" != 0 ] || [ "$GRPO_TEMPERATURE" != 1.0 ]; then
    LABEL="SFT + budget GRPO (t*=$T_STAR, KL $KL_COEF, T $GRPO_TEMPERATURE)"
fi
MODELS=(--model "$GRPO_CKPT" --label "$LABEL")
if [ "$EVAL_SFT" != 0 ]; then
    MODELS=(--model "$SFT_CKPT" --label "SFT" "${MODELS[@]}")
fi
"$PY" -m elastic_decode.eval "${MODELS[@]}" --task "$TASK" --think-budgets "$BUDGETS" \
    --solution-budget "$S_STAR" -n "$SAMPLES" --num-problems "$PROBLEMS" --temperature 0.6 \
    --top-p 0.95 --seed 0 --save-completions --output-dir "$OUT/eval"

stage "done"
echo "results: $OUT/eval/results.csv, $OUT/eval/accuracy_vs_tokens.png; training curves in $OUT/sft and $OUT/grpo"
