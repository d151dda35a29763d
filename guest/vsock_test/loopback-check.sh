#!/usr/bin/env bash
# guest/vsock_test/loopback-check.sh -- run vsock_test client and server as two processes on ONE
# Linux kernel over its vsock loopback (CID 1), once with the control connection direct over
# TCP and once through two vsock-tcp-relay processes, and print each test's outcome side by
# side: the relay must not change any outcome.
#
# Runs as root on a Linux whose AF_VSOCK may be used: the lab's outer kernel (tests/lab/run),
# never this development host (its AF_VSOCK belongs to the infrastructure). The lab's Debian
# kernel has vsock as modules that its image does not load; MODULES names a directory holding
# vsock.ko, vmw_vsock_virtio_transport_common.ko, vsock_loopback.ko (and optionally
# vsock_diag.ko) of exactly that kernel. guest/vsock_test/README.md shows the whole command.
#
#     loopback-check.sh MODULES BIN_DIR RELAY PROGRAM...
#         BIN_DIR  $PYVMM_CACHE/vsock-test/current: the programs and their list-PROGRAM.txt
#         RELAY    a vsock-tcp-relay executable (any build of guest/progs/vsock-tcp-relay.c)
#         PROGRAM  vsock_test-6.1, vsock_test-6.12, vsock_diag_test-6.1, vsock_diag_test-6.12
#
# A vsock_test run stops at its first failing test (the test calls exit), so a run that
# stopped is continued by a new run that skips every test already done (--skip); each test
# thus runs once. Output, per PROGRAM, one line per test:  <id> <direct> <relay> <name>
# with each outcome ok or FAIL, then "same" or "DIFFERENT" for the program.
# Logs are kept in $LOGS (default /tmp/vsock-loopback-check). Exit: 0 if every program's
# outcomes are the same both ways, 1 if not, 2 bad usage or set-up failure.
set -uo pipefail

((${#} >= 4)) || { echo "usage: $0 MODULES BIN_DIR RELAY PROGRAM..." >&2; exit 2; }
modules=$1 bin=$2 relay=$3
shift 3
logs=${LOGS:-/tmp/vsock-loopback-check}
run_timeout=240        # seconds for one vsock_test process (a whole 6.12 run: ~60 s in the lab;
                       # 6.12 test 22 hangs both sides on a 6.1 kernel until this ends it)
grace=10               # seconds a side may go on once the other side has exited
relay_vsock_port=9999  # the relay's own vsock port (README: away from 1234/1235)
mkdir -p "$logs"

for m in vsock vmw_vsock_virtio_transport_common vsock_loopback vsock_diag; do
    [[ -d /sys/module/$m ]] && continue
    if [[ -f $modules/$m.ko ]]; then
        insmod "$modules/$m.ko" || { echo "cannot load $m" >&2; exit 2; }
    elif [[ $m != vsock_diag ]]; then
        echo "missing $modules/$m.ko" >&2
        exit 2
    fi
done
busybox ip link set lo up || { echo "cannot bring lo up" >&2; exit 2; }

# wait_line FILE REGEX: until FILE has a line matching REGEX (10 s at most)
wait_line() {
    local i
    for ((i = 0; i < 100; i++)); do
        grep -qE "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "no line /$2/ in $1 within 10 s" >&2
    return 1
}

# one_run PROGRAM WAY CPORT SKIPS...: one client/server run, logs in $logs/PROGRAM-WAY-CPORT.*
# Each side is bounded: RUN_TIMEOUT in all, and GRACE seconds once the other side has exited
# (a side whose peer failed may wait for it forever: 6.12's "virtio credit update +
# SO_RCVLOWAT" client does, on a 6.1 kernel).
one_run() {
    local v=$1 way=$2 cport=$3 base server client relay_pids=() client_port skips=() t
    shift 3
    for s in "$@"; do skips+=(--skip="$s"); done
    base=$logs/$v-$way-$cport
    timeout $run_timeout "$bin/$v" --mode=server --control-port="$cport" \
        --peer-cid=1 "${skips[@]}" >"$base.server" 2>&1 &
    server=$!
    wait_line "$base.server" '^Control socket listening' || return 1
    client_port=$cport
    if [[ $way == relay ]]; then
        client_port=$((cport + 1))
        "$relay" --from-vsock $relay_vsock_port --to-tcp 127.0.0.1:"$cport" >"$base.relay-server" 2>&1 &
        relay_pids+=($!)
        "$relay" --from-tcp 127.0.0.1:"$client_port" --to-vsock 1:$relay_vsock_port >"$base.relay-client" 2>&1 &
        relay_pids+=($!)
        wait_line "$base.relay-server" '^vsock-tcp-relay: listening' || return 1
        wait_line "$base.relay-client" '^vsock-tcp-relay: listening' || return 1
    fi
    timeout $run_timeout "$bin/$v" --mode=client --control-host=127.0.0.1 \
        --control-port="$client_port" --peer-cid=1 "${skips[@]}" >"$base.client" 2>&1 &
    client=$!
    wait -n "$server" "$client"
    for ((t = 0; t < grace * 10; t++)); do          # the other one: GRACE seconds more
        kill -0 "$server" 2>/dev/null || kill -0 "$client" 2>/dev/null || break
        sleep 0.1
    done
    kill "$server" "$client" 2>/dev/null
    wait "$client"
    echo "client exit $?" >>"$base.client"
    wait "$server"
    echo "server exit $?" >>"$base.server"
    for p in "${relay_pids[@]}"; do kill -TERM "$p"; wait "$p"; done
    return 0
}

# outcome FILE ID: ok, FAIL, skipped (--skip) or - (not reached), from one side's output. Test
# ID's text runs from its "<id> - <name>..." line to the next test's (or the closing lines); it
# passed when that text ends in "ok" (some tests print a note first, e.g. 6.12's SIOCOUTQ
# tests on an older kernel: "Test skipped, SIOCOUTQ not supported." then "ok"). A failing test
# prints its error instead and exits.
outcome() {
    tr '\r' '\n' <"$1" | awk -v id="$2" '
        /^[0-9]+ - / { cur = $1; text[cur] = $0; next }
        /^(All tests have been executed|client exit|server exit)/ { cur = ""; next }
        cur != "" { text[cur] = text[cur] "\n" $0 }
        END {
            if (!(id in text)) print "-"
            else if (text[id] ~ /\.\.\.skipped$/) print "skipped"
            else if (text[id] ~ /ok$/) print "ok"
            else print "FAIL"
        }'
}

# results PROGRAM WAY CPORT: run until every test has an outcome; prints "id outcome" lines.
# Outcomes are taken in order up to the first test that is not ok on both sides; the run after
# it is not trusted, and the next run skips every test that has an outcome.
results() {
    local v=$1 way=$2 cport=$3 done_ids=() n progress id c s
    n=$(grep -c '^[0-9]' "$bin/list-$v.txt")
    declare -A result
    while ((${#done_ids[@]} < n)); do
        one_run "$v" "$way" "$cport" "${done_ids[@]}" || return 1
        progress=0
        for ((id = 0; id < n; id++)); do
            [[ -n ${result[$id]:-} ]] && continue
            c=$(outcome "$logs/$v-$way-$cport.client" "$id")
            s=$(outcome "$logs/$v-$way-$cport.server" "$id")
            [[ $c == - ]] && break
            progress=1
            done_ids+=("$id")
            if [[ $c == ok && $s == ok ]]; then
                result[$id]=ok
            else
                result[$id]=FAIL
                break
            fi
        done
        ((progress)) || { echo "run $v $way $cport made no progress" >&2; return 1; }
        cport=$((cport + 2))
    done
    for ((id = 0; id < n; id++)); do echo "$id ${result[$id]}"; done
}

status=0
cport=5000
for v in "$@"; do
    results "$v" direct $cport >"$logs/$v.direct" || exit 2
    results "$v" relay $((cport + 500)) >"$logs/$v.relay" || exit 2
    cport=$((cport + 1000))
    echo "== $v over vsock loopback (CID 1): id direct relay name"
    same=same
    while read -r id direct && read -r _ relayed <&3; do
        name=$(sed -n "s/^$id\t//p" "$bin/list-$v.txt")
        printf '%-3s %-6s %-6s %s\n' "$id" "$direct" "$relayed" "$name"
        [[ $direct == "$relayed" ]] || same=DIFFERENT
    done <"$logs/$v.direct" 3<"$logs/$v.relay"
    echo "== $v: $same"
    [[ $same == same ]] || status=1
done
exit $status
