#!/bin/sh
# Daily retention run, started by exam-retention.service: enforce the one-year floor and holds, re-hash a
# sample of stored footage, then audit yesterday's coverage (Asia/Shanghai). Every step runs even when an
# earlier one fails; the exit status is the worst of them (4 integrity > 3 gaps > 2 unreachable > 1 input),
# so a failed step shows as a failed unit (`systemctl status exam-retention`, journal).
set -u
BIN=${EXAM_RETENTION:-exam-retention}
SAMPLE=${EXAM_RETENTION_SCRUB_SAMPLE:-0.05}
REPORTS=${EXAM_RETENTION_REPORT_DIR:-/var/lib/exam-collector/reports}
DAY=$(TZ=Asia/Shanghai date -d yesterday +%F)
worst=0

step() {
    "$@"
    rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "exam-retention daily: '$2' exited $rc" >&2
        [ "$rc" -gt "$worst" ] && worst=$rc
    fi
    return 0
}

mkdir -p "$REPORTS" || exit 1
step "$BIN" enforce
step "$BIN" scrub --sample "$SAMPLE" --no-progress
step "$BIN" audit --from "$DAY" --to "$DAY" --format html --out "$REPORTS/audit-$DAY.html"
step "$BIN" audit --from "$DAY" --to "$DAY" --format json --out "$REPORTS/audit-$DAY.json"
exit "$worst"
