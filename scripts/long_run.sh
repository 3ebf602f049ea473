#!/usr/bin/env bash
# Start or resume the long training run of the default set v2 in the background, under nice.
#   scripts/long_run.sh [start|stop|status]
# Needs `make model` and the corpus: `.venv/bin/sparsetrace corpus --out runs/corpus-v2 --max-tokens-per-source 6000000`.
# Checkpoints go to runs/default-v2/checkpoint (every 65,536 tokens, between shuffle buffers); a stopped
# run resumes bit for bit. stdout/stderr: runs/default-v2.log; per-step log: runs/default-v2/train_log.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/default-v2}
CORPUS=${CORPUS:-runs/corpus-v2}
N_TOKENS=${N_TOKENS:-7000000}
PIDFILE="$RUN.pid"
case "${1:-start}" in
  start)
    if [[ -f $PIDFILE ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
      echo "already running (pid $(cat "$PIDFILE"))"; exit 0
    fi
    [[ -f $CORPUS/manifest.json ]] || { echo "no corpus in $CORPUS: run .venv/bin/sparsetrace corpus --out $CORPUS --max-tokens-per-source 6000000" >&2; exit 2; }
    mkdir -p "$(dirname "$RUN")"
    # the recipe chosen by scripts/recipe_sweep.py (docs/training.md), warm-started from the shipped set v1
    # (runs/ of the first 5.45M tokens was lost with its machine on 2026-12-04); extra arguments: TRAIN_ARGS.
    # No evaluation at the end: scripts/default_set_report.py evaluates the finished set on both held-out splits.
    nohup nice -n 10 .venv/bin/sparsetrace train --corpus "$CORPUS" --out "$RUN" --resume --n-tokens "$N_TOKENS" \
      --init-from transcoders/default/smollm2-135m --checkpoint-every-tokens 65536 --no-evaluate ${TRAIN_ARGS:-} \
      >>"$RUN.log" 2>&1 &
    echo $! >"$PIDFILE"
    echo "started pid $! → $RUN.log" ;;
  stop)
    if [[ -f $PIDFILE ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
      kill "$(cat "$PIDFILE")"; echo "stopped (resumes from the last checkpoint)"
    else echo "not running"; fi
    rm -f "$PIDFILE" ;;
  status)
    if [[ -f $PIDFILE ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then echo "running (pid $(cat "$PIDFILE"))"; else echo "not running"; fi
    [[ -f $RUN/checkpoint/latest.json ]] && cat "$RUN/checkpoint/latest.json" && echo
    [[ -f $RUN/train_log.jsonl ]] && tail -n 1 "$RUN/train_log.jsonl" | cut -c1-300 ;;
  *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
