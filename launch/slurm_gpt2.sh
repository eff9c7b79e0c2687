#!/usr/bin/env bash
# Train a recipe on Slurm: one torchrun per node (srun), c10d rendezvous on the head node.
#
#   sbatch [sbatch options] launch/slurm_gpt2.sh [RECIPE] [--section.key=value ...]
#
# The #SBATCH lines below are defaults for GPU nodes; any sbatch option given on the command line
# overrides them (e.g. sbatch --nodes=4 --time=2-00:00:00 ...). Re-submitting the same command,
# or a requeue, resumes the run from its newest complete checkpoint.
#
# Before the time limit Slurm sends SIGUSR1 to this script (--signal); it passes SIGTERM to the
# training processes, which stop at the same step, save a checkpoint and exit with code 75; the
# job then requeues itself and resumes. Preemption (SIGTERM from Slurm) takes the same path.
#
# CPU clusters (and the tests): SCALING_DEVICE=cpu, processes per node = CPUs per task /
# SCALING_THREADS (default 1 thread per process), gloo instead of NCCL.
#
# The job's output (gpt2-<job>.out) tells the story: the preflight's table and problems, which
# log to `tail -f` for progress once training starts, every rank's error line once (with how many
# ranks on which nodes said it), a requeue, and a last line: how the job ended and where the
# details are. Each node's full output is in logs/ (SCALING_LOG_DIR): <job name>-<job>-node<k>.out,
# and <job name>-<job>-preflight-node<k>.err for the preflight.
#SBATCH --job-name=gpt2
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

# Traps first: with a time limit shorter than --signal's lead (or on a requeued job), Slurm
# signals the script as soon as it starts, and an untrapped USR1 would kill it.
stop_requested=0
started=0
on_signal() {  # forwarded as SIGTERM to the job steps: torchrun passes it on to every worker
  if [ "$started" = 0 ]; then  # nothing to save yet; requeueing would only repeat this
    echo "$(date +%T) $1 before training started: ignored (is --time shorter than --signal's lead?)"
    return
  fi
  stop_requested=1
  echo "$(date +%T) $1: asking the training processes to save and stop"
  scancel --signal=TERM "$SLURM_JOB_ID"
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

RECIPE=${1:-recipes/gpt2_124m_fsdp.yaml}
shift || true
cd "${SLURM_SUBMIT_DIR:-.}"
source launch/nccl_env.sh

LOG_DIR=${SCALING_LOG_DIR:-logs}  # one file per node and job
mkdir -p "$LOG_DIR"
LOGS="$(cd "$LOG_DIR" && pwd)/$SLURM_JOB_NAME-$SLURM_JOB_ID"  # absolute: the paths below work anywhere

# Elastic (SCALING_MIN_NODES below the job's node count): a node that dies does not end the job.
# The other nodes' workers fail in a collective (within parallel.timeout_s), torchrun restarts them
# on the nodes left (at least SCALING_MIN_NODES) and they resume from the newest checkpoint on the
# smaller world size. If the head node's processes are the ones lost (the rendezvous lives there),
# the step ends, and the job requeues itself and leaves that node out of its later steps (Slurm lets
# no running job change its own nodes; a node Slurm itself finds dead, it requeues the job without).
# SCALING_MAX_RESTARTS (default 3) bounds both: torchrun's restarts per step, the job's requeues
# after a failure. Unset, every node is needed and the first to fail ends the job (--kill-on-bad-exit).
mapfile -t ALL_NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
LOST_FILE="$LOGS-lost-nodes"  # one per line, kept over requeues: the job id stays
NODES=()
for n in "${ALL_NODES[@]}"; do
  grep -qsx "$n" "$LOST_FILE" || NODES+=("$n")
done
NNODES=${#NODES[@]}
MIN_NODES=${SCALING_MIN_NODES:-${#ALL_NODES[@]}}
MAX_RESTARTS=${SCALING_MAX_RESTARTS:-3}
if ! [[ "$MIN_NODES" =~ ^[0-9]+$ ]] || (( MIN_NODES < 1 || MIN_NODES > ${#ALL_NODES[@]} )); then
  echo "error: SCALING_MIN_NODES=$MIN_NODES: expected a node count from 1 to the job's ${#ALL_NODES[@]}" >&2
  exit 2
fi
if ! [[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]]; then
  echo "error: SCALING_MAX_RESTARTS=$MAX_RESTARTS: expected a whole number, e.g. 3" >&2
  exit 2
fi
if (( NNODES < MIN_NODES )); then
  echo "$(date +%T) job $SLURM_JOB_ID ended: failed; only $NNODES of its ${#ALL_NODES[@]} nodes are left" \
       "(lost: $(paste -sd, "$LOST_FILE")), fewer than SCALING_MIN_NODES=$MIN_NODES"
  exit 1
fi
STEP_NODES=()  # every node of the job, unless some were lost
(( NNODES == ${#ALL_NODES[@]} )) || STEP_NODES=(--nodes="$NNODES" --ntasks="$NNODES" --nodelist="$(IFS=,; echo "${NODES[*]}")")
if (( MIN_NODES < ${#ALL_NODES[@]} )); then
  ELASTIC=1
  ON_FAILURE=(--kill-on-bad-exit=0 --no-kill)  # the other nodes carry on
  RDZV=(--nnodes="$MIN_NODES:$NNODES" --max-restarts="$MAX_RESTARTS")  # scaling.launch sets the timeouts
else
  ELASTIC=0
  ON_FAILURE=(--kill-on-bad-exit=1)
  RDZV=(--nnodes="$NNODES")
fi

# The head node's address as Slurm knows it (NodeAddr), not whatever DNS makes of its name;
# a port derived from the job id, so concurrent jobs on one node do not collide, and below
# Linux's ephemeral range (32768-60999), which the kernel hands out to outgoing connections.
HEAD_NODE=${NODES[0]}
HEAD_ADDR=$(scontrol show node "$HEAD_NODE" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
PORT=$(( 20000 + SLURM_JOB_ID % 12000 ))

# torchrun gives its workers 30 s from SIGTERM to SIGKILL; the stop-save of an XL run to a network
# filesystem takes longer. Give them the signal's lead time (--signal=B:USR1@300 above; set
# SCALING_SIGNAL_LEAD if you change it) less a minute for the requeue. torchrun reads this from
# torch 2.12 on; scaling.launch gives torch 2.11 the same.
SIGNAL_LEAD=${SCALING_SIGNAL_LEAD:-300}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-$(( SIGNAL_LEAD > 90 ? SIGNAL_LEAD - 60 : 30 ))}

CPUS=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
if [ "${SCALING_DEVICE:-cuda}" = cpu ]; then
  THREADS=${SCALING_THREADS:-1}
  NPROC=$(( CPUS / THREADS > 0 ? CPUS / THREADS : 1 ))
  DEVICE_ARGS=(--train.device=cpu)
else
  NPROC=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L | wc -l)}
  THREADS=$(( CPUS / NPROC > 0 ? CPUS / NPROC : 1 ))
  DEVICE_ARGS=()
fi
export OMP_NUM_THREADS=$THREADS
export PYTHONUNBUFFERED=1  # the logs show each line as it is printed, not a buffer's worth later
source launch/find_python.sh
find_python || exit 2
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NNODES nodes x $NPROC processes," \
     "head $HEAD_NODE ($HEAD_ADDR:$PORT), recipe $RECIPE"
LEFT_OUT=${STEP_NODES[*]:+; left out, lost before: $(paste -sd, "$LOST_FILE")}
(( ELASTIC )) && echo "elastic: carries on with at least $MIN_NODES nodes (SCALING_MIN_NODES)$LEFT_OUT"

step_logs() {  # step_logs NAME: each node's log of a step, node k's k-th, as PATH@SIZE. A requeued
  local k f    # job appends to the same files: what a step says starts at SIZE.
  for (( k = 0; k < NNODES; k++ )); do
    f="$LOGS-${1/\%t/$k}"
    echo "$f@$(stat -c %s "$f" 2> /dev/null || echo 0)"
  done
}
report() {  # report STATUS LOG@SIZE...: print the logs' error lines, each once; set CODE and HOW
  local status=$1
  shift
  "$PYTHON" -m scaling.launch --report "$@" && CODE=0 || CODE=$?
  [ "$CODE" != 0 ] || CODE=$status  # the logs explain nothing: srun's own status
  [ "$CODE" = 2 ] && HOW="bad input (exit 2)" || HOW="failed with exit $CODE"
}
said() {  # said PATTERN LOG@SIZE...: true when a step's log has a line matching PATTERN (grep -x)
  local pattern=$1 f
  shift
  for f in "$@"; do
    tail -c +$(( ${f##*@} + 1 )) "${f%@*}" 2> /dev/null | grep -qx "$pattern" && return 0
  done
  return 1
}
lost_nodes() {  # lost_nodes LOG@SIZE...: the nodes whose launcher ended the step without its last
  local k=0 f   # line (finished, stopped, or an error) while another node's said it: killed with
  local -a silent=()  # their node. When none said it, the step itself failed: nobody is to blame.
  for f in "$@"; do
    said '\(error: \)\?launch: .*' "$f" || silent+=("${NODES[$k]}")
    k=$(( k + 1 ))
  done
  (( ${#silent[@]} < $# )) && printf '%s\n' "${silent[@]}"
  return 0
}
ended() {  # ended HOW LOG@SIZE...: the job's last line
  local how=$1
  shift
  local where="${*%@*}"
  if (( $# > 4 )); then where="${1%%@*}"; where="${where%0.*}*.${where##*.} (one per node)"; fi
  echo "$(date +%T) job $SLURM_JOB_ID ended: $how; details: $where"
}

# The preflight: every node's versions, GPUs and network, the run folder and the interconnect,
# checked in seconds before any GPU-hour is spent (python -m scaling.preflight; SCALING_PREFLIGHT=0
# skips it). Its report goes to this job's output, torchrun's own noise to the logs.
if [ "${SCALING_PREFLIGHT:-1}" != 0 ]; then
  mapfile -t STEP_LOGS < <(step_logs preflight-node%t.err)
  if srun --kill-on-bad-exit=1 "${STEP_NODES[@]}" --cpus-per-task="$CPUS" --error="$LOG_DIR/%x-%j-preflight-node%t.err" \
      "$PYTHON" -m scaling.launch --nnodes="$NNODES" --nproc_per_node="$NPROC" \
      --rdzv_backend=c10d --rdzv_endpoint="$HEAD_ADDR:$(( PORT + 1 ))" --rdzv_id="$SLURM_JOB_ID-preflight" \
      -m scaling.preflight "$RECIPE" "${DEVICE_ARGS[@]}" "$@"; then
    status=0
  else
    status=$?
  fi
  if [ "$status" != 0 ]; then
    report "$status" "${STEP_LOGS[@]}"
    ended "$HOW; preflight failed: nothing was trained (SCALING_PREFLIGHT=0 skips it)" "${STEP_LOGS[@]}"
    exit "$CODE"
  fi
fi

# Rank 0 prints the progress, on whichever node the rendezvous put it: name that node's log as
# soon as rank 0 has printed its first line ("model: ..."), or once srun has ended.
follow_rank0() {
  local f last=0
  while [ "$last" = 0 ]; do
    kill -0 "$SRUN" 2> /dev/null || last=1
    for f in "$@"; do
      if grep -qs '^model: ' <(tail -c +$(( ${f##*@} + 1 )) "${f%@*}" 2> /dev/null); then
        echo "$(date +%T) training started; progress: tail -f ${f%@*}"
        return
      fi
    done
    sleep 1
  done
}

# Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch: without it every
# node's workers would share one core.
# scaling.launch is torchrun ending in 75 when all its workers saved and stopped (see launch.py).
mapfile -t STEP_LOGS < <(step_logs node%t.out)
srun "${ON_FAILURE[@]}" "${STEP_NODES[@]}" --cpus-per-task="$CPUS" --output="$LOG_DIR/%x-%j-node%t.out" \
  "$PYTHON" -m scaling.launch "${RDZV[@]}" --nproc_per_node="$NPROC" \
    --rdzv_backend=c10d --rdzv_endpoint="$HEAD_ADDR:$PORT" --rdzv_id="$SLURM_JOB_ID" \
    -m scaling.train "$RECIPE" "${DEVICE_ARGS[@]}" "$@" &
SRUN=$!
started=1
follow_rank0 "${STEP_LOGS[@]}" &
FOLLOW=$!
status=0
while true; do  # a trapped signal interrupts `wait`; keep waiting for srun itself
  wait "$SRUN" && status=0 || status=$?
  kill -0 "$SRUN" 2> /dev/null || break
done
wait "$FOLLOW" || true  # it ends within a second of srun

# Elastic: srun's status is the lost node's (137), though the nodes left finished the run.
if [ "$status" = 0 ] || { (( ELASTIC )) && said 'launch: all [0-9]* workers finished' "${STEP_LOGS[@]}"; }; then
  LOST=$(lost_nodes "${STEP_LOGS[@]}" | paste -sd,)
  ended "finished${LOST:+ (node $LOST lost on the way: the others carried on)}" "${STEP_LOGS[@]}"
  exit 0
fi
report "$status" "${STEP_LOGS[@]}"
# Stopped early, not finished: after our own stop request, or when the training processes
# themselves saved and stopped (a SIGTERM that reached them directly): the report says 75 then,
# whatever srun's status (--kill-on-bad-exit ends the nodes slower to exit than the first).
if [ "$stop_requested" = 1 ] || [ "$CODE" = 75 ]; then
  echo "$(date +%T) stopped after saving (srun exit $status); requeueing job $SLURM_JOB_ID"
  if scontrol requeue "$SLURM_JOB_ID"; then
    ended "stopped and requeued (it resumes from the checkpoint just saved)" "${STEP_LOGS[@]}"
    exit 0  # the job goes on: pending again, it resumes from the checkpoint just saved
  fi
  echo "$(date +%T) cannot requeue (sbatch --no-requeue?): run the same sbatch command to resume"
  ended "stopped, not requeued (exit 75)" "${STEP_LOGS[@]}"
  exit 75
fi
# Elastic: a failure the nodes left could not carry on from (the head node lost, fewer than
# SCALING_MIN_NODES left, restarts used up) requeues the job, without the nodes lost.
if (( ELASTIC )) && [ "$CODE" != 2 ]; then
  FAILURES="$LOGS-failures"  # one line per requeue after a failure
  if (( $(cat "$FAILURES" 2> /dev/null | wc -l) < MAX_RESTARTS )); then
    LOST=$(lost_nodes "${STEP_LOGS[@]}")
    [ -z "$LOST" ] || echo "$LOST" >> "$LOST_FILE"
    echo "$(date +%T) failed${LOST:+ (lost: $(echo "$LOST" | paste -sd,))}; requeueing job $SLURM_JOB_ID" \
         "(failure $(( $(cat "$FAILURES" 2> /dev/null | wc -l) + 1 )) of SCALING_MAX_RESTARTS=$MAX_RESTARTS)"
    date +%T >> "$FAILURES"
    # The line first: a requeue may end this script before the next one.
    ended "$HOW; requeued (it resumes from the newest complete checkpoint)" "${STEP_LOGS[@]}"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "$(date +%T) cannot requeue (sbatch --no-requeue?): run the same sbatch command to resume"
  fi
fi
ended "$HOW" "${STEP_LOGS[@]}"
exit "$CODE"
