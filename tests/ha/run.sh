#!/bin/sh
# The seed's verification, automated: a cluster in network namespaces,
# one message with a large attachment to every user in one transaction,
# small messages and POP3 clients at the same time, power cuts of the
# owner node and switchovers; then every maildrop is checked. See
# tests/ha.rs and the README ("Verifying failover").
#
#   sudo tests/ha/run.sh                          # 1000 users, 1 MiB (the seed's run)
#   sudo tests/ha/run.sh --users 100 --size 100K  # the reduced run CI does (CI also with --topology disk)
#   sudo tests/ha/run.sh --topology 3 --report /tmp/ha.txt
#   sudo tests/ha/run.sh --topology disk        # shared-disk mode (loop device)
#
# Exits non-zero on any loss, duplicate or damage.
set -eu
users=1000 size=1M senders=4 pop3=2 topology=2+witness report= profile=--release
usage() {
    echo "usage: $0 [--users N] [--size BYTES|nK|nM] [--senders N] [--pop3 N] [--topology 2+witness|3|disk] [--report FILE] [--debug]" >&2
    exit 2
}
while [ $# -gt 0 ]; do
    case "$1" in
        --users) users=$2; shift 2 ;;
        --size) size=$2; shift 2 ;;
        --senders) senders=$2; shift 2 ;;
        --pop3) pop3=$2; shift 2 ;;
        --topology)
            topology=$2; shift 2
            case "$topology" in 2+witness|3|disk) ;; *) echo "$0: --topology: '$topology' is not one of 2+witness, 3, disk" >&2; usage ;; esac ;;
        --report) report=$2; shift 2 ;;
        --debug) profile=; shift ;;
        -h|--help) usage ;;
        *) echo "$0: unknown argument '$1'" >&2; usage ;;
    esac
done
if [ "$(id -u)" != 0 ]; then
    echo "$0: needs root (network namespaces, addresses, links)" >&2
    exit 2
fi
cd "$(dirname "$0")/../.."
export HAMAIL_HA_USERS="$users" HAMAIL_HA_SIZE="$size" HAMAIL_HA_SENDERS="$senders" \
    HAMAIL_HA_POP3="$pop3" HAMAIL_HA_TOPOLOGY="$topology" HAMAIL_HA_REPORT="$report"
exec cargo test $profile --test ha -- --nocapture --test-threads=1
