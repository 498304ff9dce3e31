#!/usr/bin/env bash
# Stop the daemons tests/services/slurm-up.sh started, by PID, in reverse order, waiting for each.
SLURM_DIR=${SLURM_DIR:-/tmp/slurm-ci}
alive() { [ -e "/proc/$1" ] && ! awk '{exit !($3=="Z")}' "/proc/$1/stat" 2>/dev/null; }  # zombie = gone
stop_pidfile() {
  local f=$1 pid
  pid=$(cat "$f" 2>/dev/null) || return 0
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 60); do alive "$pid" || break; sleep 0.25; done
  alive "$pid" && kill -9 "$pid" 2>/dev/null
  rm -f "$f"
}
# cancel leftover jobs first, or their slurmstepd/job processes outlive slurmd
if [ -e "$SLURM_DIR/slurmctld.pid" ]; then
  export SLURM_CONF="$SLURM_DIR/slurm.conf"
  jobs=$(timeout 10 squeue -h -o %A 2>/dev/null || true)
  [ -n "$jobs" ] && timeout 10 scancel $jobs
  for _ in $(seq 1 60); do [ -z "$(timeout 5 squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.25; done
fi
stop_pidfile "$SLURM_DIR/slurmd.pid"
stop_pidfile "$SLURM_DIR/slurmctld.pid"
stop_pidfile "$SLURM_DIR/slurmdbd.pid"
stop_pidfile "$SLURM_DIR/mysqlrun/mysql.pid"
if [ -e "$SLURM_DIR/.we_started_munged" ]; then stop_pidfile /run/munge/munged.pid; rm -f "$SLURM_DIR/.we_started_munged"; fi
# optional: rm -rf "$SLURM_DIR"   (state, spool, logs, database)
