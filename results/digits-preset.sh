#!/usr/bin/env bash
# Choice of the digits preset's loss settings, measured on the validation split (never on test).
# Usage: bash results/digits-preset.sh > results/digits-preset.md   (about 5 minutes on 2 CPU cores)
set -euo pipefail
export DEFLECT_DB="${DEFLECT_DB:-$(mktemp -d)/deflect.db}"
variants=(
  "default|"
  "eps2=0.05|--eps2 0.05"
  "eps2=0.3|--eps2 0.3"
  "eps1=30|--eps1 30"
  "no angle|--no-angle"
  "no transfer|--no-transfer"
  "independent|--method independent"
)
echo "# digits preset: validation-split choice of the loss settings"
echo
echo "Machine: $(nproc --all) CPU cores, $(python3 -c 'import torch; print("torch", torch.__version__)'); $(date -u +%F)."
echo "Each row: \`deflect train --n 3 --dataset digits FLAGS\`, then"
echo "\`deflect evaluate RUN --attack pgd1 --split val --json\` (PGD-7, ε=0.15, 144 validation images)."
echo
echo "| variant | flags | clean val % (mean) | white-box % | black-box % (mean±std) | train s |"
echo "|---|---|---|---|---|---|"
for v in "${variants[@]}"; do
  name="${v%%|*}"; flags="${v#*|}"
  # shellcheck disable=SC2086
  run=$(deflect train --n 3 --dataset digits $flags 2>/dev/null)
  deflect evaluate "$run" --attack pgd1 --split val --json 2>/dev/null | python3 -c "
import json, sys
import deflect
e = json.load(sys.stdin)['evaluations'][0]
run = deflect.Store().get_run('$run')
print(f\"| $name | \`$flags\` | {sum(e['clean'])/len(e['clean']):.1f} | {e['whitebox_mean']:.1f} | \"
      f\"{e['blackbox_mean']:.1f}±{e['blackbox_std']:.1f} | {run.seconds:.0f} |\")"
done
