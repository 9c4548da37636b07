#!/bin/bash
# What runbook.sh OUTDIR has written so far, as one file in $OUT (the device tool returns at most 8 files), the
# steps so far and the end of the running step's console.
d=${1:?usage: collect.sh OUTDIR}
cat "$d/steps.txt" 2>/dev/null
mkdir -p "$OUT" && tar czf "$OUT/run.tgz" -C "$(dirname "$d")" "$(basename "$d")" 2>/dev/null
cur=$(tail -1 "$d/steps.txt" 2>/dev/null | awk '{print $3}')
[ -n "$cur" ] && tail -c 1200 "$d/$cur.log" 2>/dev/null
true
