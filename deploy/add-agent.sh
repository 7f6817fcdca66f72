#!/usr/bin/env bash
# Adds a venue's edge agent: enrols its public key with the collector, then creates its broker
# account (username = agent id, random password) and reloads mosquitto.
#
#   deploy/add-agent.sh --agent ID --venue CODE --institution CODE --pubkey KEY [--replace]
#                       [--collector-config PATH] [--passwd-file PATH] [--password-out PATH]
#                       [--reload-cmd CMD | --no-reload]
#
# KEY is the line `exam-edge pubkey` prints on the venue machine. The password is written to
# --password-out (mode 0600, default ./ID.mqtt.pass); copy it to the venue machine as
# /etc/exam-edge/mqtt.pass ([mqtt] password_file) and delete this copy.
# Exit codes: 0 done, 1 bad input, otherwise exam-collector's own code (2 unreachable database).
set -euo pipefail

prog=add-agent.sh
die() { echo "$prog: error: $1" >&2; exit "${2:-1}"; }

agent="" venue="" pubkey="" institution="" replace=""
collector_config="${EXAM_COLLECTOR_CONFIG:-/etc/exam-collector/collector.toml}"
passwd_file=/etc/mosquitto/exam/passwd
password_out=""
reload_cmd="systemctl reload mosquitto"
collector_bin="${EXAM_COLLECTOR_BIN:-exam-collector}"

while [ $# -gt 0 ]; do
    case "$1" in
        --agent) agent="${2-}"; shift 2 ;;
        --venue) venue="${2-}"; shift 2 ;;
        --pubkey) pubkey="${2-}"; shift 2 ;;
        --institution) institution="${2-}"; shift 2 ;;
        --replace) replace=1; shift ;;
        --collector-config) collector_config="${2-}"; shift 2 ;;
        --passwd-file) passwd_file="${2-}"; shift 2 ;;
        --password-out) password_out="${2-}"; shift 2 ;;
        --reload-cmd) reload_cmd="${2-}"; shift 2 ;;
        --no-reload) reload_cmd=""; shift ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1; see $prog --help" ;;
    esac
done

[ -n "$agent" ] || die "--agent is missing; pass the agent id from the venue's [agent] id"
[ -n "$venue" ] || die "--venue is missing; pass the venue code, e.g. JL2201001-01"
[ -n "$institution" ] || die "--institution is missing; pass the institution code (机构代码), e.g. JL2201001"
[ -n "$pubkey" ] || die "--pubkey is missing; pass the line \`exam-edge pubkey\` prints on the venue machine"
# The id is the MQTT username and the %u in the ACL patterns: no topic separators or wildcards.
[[ "$agent" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] \
    || die "--agent '$agent' may contain only letters, digits, '.', '_' and '-'; fix the id"
[[ "$agent" != collector-* && "$agent" != alerts && "$agent" != audit ]] \
    || die "--agent '$agent' is reserved for collector accounts, alerts and the audit checkpoint; choose another agent id"
command -v mosquitto_passwd >/dev/null || die "mosquitto_passwd is not installed; apt-get install mosquitto"
command -v "$collector_bin" >/dev/null || die "$collector_bin is not on PATH; activate the collector's venv"
[ -f "$collector_config" ] || die "collector config $collector_config does not exist; pass --collector-config PATH"
password_out="${password_out:-./$agent.mqtt.pass}"

if [ -f "$passwd_file" ] && grep -q "^$agent:" "$passwd_file" && [ -z "$replace" ]; then
    die "agent $agent already has a broker account in $passwd_file; add --replace to give it a new password"
fi

enroll=("$collector_bin" --config "$collector_config" enroll --agent "$agent" --venue "$venue"
        --institution "$institution" --pubkey "$pubkey")
[ -n "$replace" ] && enroll+=(--replace)
"${enroll[@]}" || exit $?

password="$(openssl rand -hex 24)"
mkdir -p "$(dirname "$passwd_file")"
if [ -f "$passwd_file" ]; then
    mosquitto_passwd -b "$passwd_file" "$agent" "$password"
else
    mosquitto_passwd -c -b "$passwd_file" "$agent" "$password"
fi
(umask 077; printf '%s\n' "$password" > "$password_out")
echo "broker account $agent written to $passwd_file; password in $password_out (copy it to the venue as /etc/exam-edge/mqtt.pass)"

if [ -n "$reload_cmd" ]; then
    sh -c "$reload_cmd" || die "'$reload_cmd' failed; reload mosquitto yourself (systemctl reload mosquitto) so it reads $passwd_file"
    echo "mosquitto reloaded"
fi
