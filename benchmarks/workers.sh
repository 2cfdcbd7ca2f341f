# Sourced by run_sweeps.sh and run_trust.sh. `run ARGS...` starts `python ARGS...` in $WORKERS processes (default 1)
# that share one grid file, each on one thread (so no result depends on WORKERS), and fails when any of them fails.
WORKERS=${WORKERS:-1}
run() {
    local pids=() rc=0 pid
    for _ in $(seq 2 "$WORKERS"); do OMP_NUM_THREADS=1 python "$@" & pids+=($!); sleep 10; done
    OMP_NUM_THREADS=1 python "$@" || rc=$?
    for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
    return "$rc"
}
