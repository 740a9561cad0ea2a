#!/bin/sh
# Install the external tools `python -m loadtest.bench_proxy` compares against: wrk (the load
# generator for the max-throughput runs) and HAProxy (the reference proxy).
#
# Both are optional: without wrk the benchmark uses its built-in asyncio load generator, and
# without HAProxy it skips the HAProxy rows. This script exists so a fresh machine can get the
# full comparison with one command. It installs with apt-get (Debian, Ubuntu) when a tool is
# missing and it runs as root; otherwise it prints the command to run and exits 0, so calling
# it before the benchmark never blocks the benchmark.
#
# Usage: sh loadtest/install-bench-tools.sh [--check]
#   --check   only report what is missing; install nothing

set -eu

check_only=0
case "${1:-}" in
    --check) check_only=1 ;;
    "") ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install-bench-tools: unknown argument: $1 (try --help)" >&2; exit 2 ;;
esac

# HAProxy installs into sbin, which a normal user's PATH often lacks.
have() {
    command -v "$1" >/dev/null 2>&1 && return 0
    for dir in /usr/local/sbin /usr/sbin /sbin; do
        [ -x "$dir/$1" ] && return 0
    done
    return 1
}

missing=""
for tool in wrk haproxy; do
    if have "$tool"; then
        echo "install-bench-tools: $tool found"
    else
        missing="$missing $tool"
    fi
done
missing="${missing# }"

if [ -z "$missing" ]; then
    exit 0
fi
echo "install-bench-tools: missing: $missing"
if [ "$check_only" -eq 1 ]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-bench-tools: no apt-get here; install '$missing' with your package manager" \
         "(e.g. 'brew install $missing' on macOS). The benchmark runs without them."
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-bench-tools: not root; to install, run:"
    echo "    sudo apt-get update && sudo apt-get install -y --no-install-recommends $missing"
    echo "install-bench-tools: the benchmark runs without them (built-in generator, no HAProxy)."
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
# A package that cannot be installed must not stop the benchmark, so failures only warn.
if apt-get update -q && apt-get install -y -q --no-install-recommends $missing; then
    echo "install-bench-tools: installed $missing"
else
    echo "install-bench-tools: warning: apt-get could not install '$missing';" \
         "the benchmark runs without them." >&2
fi
exit 0
