#!/usr/bin/env bash
# Create a Cloud TPU VM slice, put evejax on every worker and run the same
# evejax command on all of them (big_vision / MaxText style). See launch/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh COMMAND --name NAME --zone ZONE [flags] [-- EVEJAX_ARGS...]

Commands:
  create   create the slice (`tpu-vm create`, or a queued resource with --queued,
           waiting until it is ACTIVE)
  copy     send this checkout to every worker as a tarball (~/evejax), or with
           --git URL clone/pull it there
  setup    on every worker: make ~/evejax/.venv and install evejax[tpu]
  run      on every worker: `evejax EVEJAX_ARGS`; output streamed here and
           appended to ~/evejax/logs/NAME.HOSTNAME.log on each worker
  logs     tail each worker's log (--follow to keep reading)
  stop     SIGTERM the evejax run on every worker (it checkpoints, then exits)
  status   describe the slice (or the queued resource)
  delete   delete the slice (with --queued: the queued resource and its slice)
  all      create, copy, setup, run

Flags:
  --name NAME               TPU VM (and queued resource) name
  --zone ZONE               e.g. us-central2-b, us-east5-a
  --project PROJECT         default: gcloud's configured project
  --accelerator-type TYPE   e.g. v4-8, v5p-64, v5litepod-256, v6e-256
                            (create/all; run looks it up when omitted)
  --version VERSION         TPU runtime; default per family: v2/v3/v4
                            tpu-ubuntu2204-base, v5p v2-alpha-tpuv5,
                            v5litepod v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e
  --spot                    Spot capacity (preemptible: evejax checkpoints on SIGTERM)
  --queued                  use `gcloud compute tpus queued-resources`
  --git URL                 copy: clone URL on every worker instead of a tarball
  --detach                  run: keep running after this ssh session ends
  --worker W                logs/stop: which workers (default all)
  --follow                  logs: keep following
  --dry-run                 print each gcloud command ('+ ' first) instead of running it

Example:
  launch/tpu_vm.sh all --name eve --zone us-east5-a --accelerator-type v5p-64 --spot \
    -- train --config configs/eve.py:7b_stage1 --workdir gs://BUCKET/eve/stage1
EOF
}

die() { echo "tpu_vm.sh: error: $*" >&2; exit 1; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_DIR=evejax

cmd="" name="" zone="" project="" type="" version="" git_url="" worker=all
spot=false queued=false detach=false follow=false dry_run=false
evejax_args=()

while [[ $# -gt 0 ]]; do
  if [[ "$1" == --*=* ]]; then
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
  fi
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --name | --zone | --project | --accelerator-type | --version | --git | --worker)
      [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"
      case "$1" in
        --name) name="$2" ;;
        --zone) zone="$2" ;;
        --project) project="$2" ;;
        --accelerator-type) type="$2" ;;
        --version) version="$2" ;;
        --git) git_url="$2" ;;
        --worker) worker="$2" ;;
      esac
      shift 2 ;;
    --spot) spot=true; shift ;;
    --queued) queued=true; shift ;;
    --detach) detach=true; shift ;;
    --follow) follow=true; shift ;;
    --dry-run) dry_run=true; shift ;;
    --) shift; evejax_args=("$@"); break ;;
    -*) die "unknown flag $1 (see --help)" ;;
    *)
      [[ -z "$cmd" ]] || die "two commands given: '$cmd' and '$1' (evejax arguments go after --)"
      cmd="$1"; shift ;;
  esac
done

[[ -n "$cmd" ]] || { usage >&2; exit 2; }
case "$cmd" in
  create | copy | setup | run | logs | stop | status | delete | all) ;;
  *) die "unknown command '$cmd' (see --help)" ;;
esac
[[ -n "$name" ]] || die "--name is required"
[[ -n "$zone" ]] || die "--zone is required"
if [[ ("$cmd" == run || "$cmd" == all) && ${#evejax_args[@]} -eq 0 ]]; then
  die "$cmd needs the evejax command after --, e.g. -- train --config configs/eve.py:tiny"
fi

where=(--zone="$zone")
[[ -n "$project" ]] && where+=(--project="$project")
tpu_vm=(gcloud compute tpus tpu-vm)
queued_resources=(gcloud compute tpus queued-resources)

# Prints a command as shell input: words that need it are single-quoted (for
# --flag=value only the value), so a printed line can be pasted back.
show() {
  local line="+" word flag q="'\\''"
  for word in "$@"; do
    flag=""
    if [[ "$word" =~ ^(--[a-z-]+=)(.*)$ ]]; then
      flag="${BASH_REMATCH[1]}" word="${BASH_REMATCH[2]}"
    fi
    if [[ ! "$word" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
      word="'${word//\'/$q}'"
    fi
    line+=" $flag$word"
  done
  printf '%s\n' "$line"
}

# Runs a command, or only prints it under --dry-run.
run() {
  if $dry_run; then
    show "$@"
  else
    show "$@" >&2
    "$@"
  fi
}

ssh_all() { run "${tpu_vm[@]}" ssh "$name" --worker="${2:-all}" "${where[@]}" --command="$1"; }

default_version() {
  case "$1" in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default runtime for accelerator type '$1': pass --version" ;;
  esac
}

check_type() {
  [[ "$type" =~ ^[a-z0-9]+-[0-9]+$ ]] \
    || die "accelerator type '$type' is not of the form FAMILY-SIZE (v4-8, v5p-64, v5litepod-256, v6e-256)"
}

# A slice spans several hosts when its size (TensorCores for v2-v5p, chips for
# v5e/v6e) is over 8: every family puts at most 8 of them on one host.
multi_host() { [[ "${type##*-}" -gt 8 ]]; }

do_create() {
  [[ -n "$type" ]] || die "create needs --accelerator-type (e.g. v5p-64)"
  check_type
  [[ -n "$version" ]] || version="$(default_version "$type")"
  local -a create
  if $queued; then
    create=("${queued_resources[@]}" create "$name" "${where[@]}" --node-id="$name"
      --accelerator-type="$type" --runtime-version="$version")
  else
    create=("${tpu_vm[@]}" create "$name" "${where[@]}" --accelerator-type="$type" --version="$version")
  fi
  $spot && create+=(--spot)
  run "${create[@]}"
  $queued || return 0
  local describe=("${queued_resources[@]}" describe "$name" "${where[@]}" --format='value(state.state)')
  if $dry_run; then
    show "${describe[@]}"
    return
  fi
  local state
  while :; do
    state="$("${describe[@]}")" || die "could not describe queued resource $name"
    case "$state" in
      ACTIVE) return ;;
      FAILED | SUSPENDED) die "queued resource $name is $state (see: $0 status --queued --name $name --zone $zone)" ;;
    esac
    echo "tpu_vm.sh: queued resource $name is ${state:-not listed yet}; waiting" >&2
    sleep 60
  done
}

do_copy() {
  if [[ -n "$git_url" ]]; then
    local url
    url="$(printf '%q' "$git_url")"
    ssh_all "if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR pull --ff-only; else git clone $url $REMOTE_DIR; fi"
    return
  fi
  copy_tmp="$(mktemp -d)"
  trap 'rm -rf "$copy_tmp"' EXIT
  run tar -czf "$copy_tmp/evejax.tar.gz" -C "$ROOT" --exclude=./.venv --exclude=./.git \
    --exclude=./runs --exclude=./out --exclude=__pycache__ --exclude=.pytest_cache .
  run "${tpu_vm[@]}" scp "$copy_tmp/evejax.tar.gz" "$name:evejax.tar.gz" --worker=all "${where[@]}"
  ssh_all "mkdir -p $REMOTE_DIR && tar -xzf evejax.tar.gz -C $REMOTE_DIR && rm evejax.tar.gz"
}

do_setup() {
  # TPU runtime images may lack ensurepip, which `python3 -m venv` needs.
  ssh_all "{ python3 -c 'import ensurepip' 2>/dev/null || { sudo apt-get -qq update && sudo apt-get -qq install -y python3-venv; }; } && cd $REMOTE_DIR && EVEJAX_EXTRAS=tpu bash launch/local.sh setup"
}

do_run() {
  if [[ -z "$type" ]]; then
    $dry_run && die "run --dry-run needs --accelerator-type (to decide whether the slice is multi-host)"
    type="$("${tpu_vm[@]}" describe "$name" "${where[@]}" --format='value(acceleratorType)')"
    [[ -n "$type" ]] || die "could not read the accelerator type of $name: pass --accelerator-type"
  fi
  check_type
  # local.sh writes its pid (the evejax process, as it execs) to EVEJAX_PIDFILE for `stop`.
  local env="PYTHONUNBUFFERED=1 EVEJAX_EXTRAS=tpu EVEJAX_PIDFILE=logs/$name.pid"
  multi_host && env+=" EVEJAX_DISTRIBUTED=1"
  local args log
  args="$(printf ' %q' "${evejax_args[@]}")"
  log="logs/$name.\$(hostname).log"
  local start="cd $REMOTE_DIR && mkdir -p logs && echo \"== \$(date -u +%FT%TZ)\" evejax$args >>\"$log\""
  if $detach; then
    ssh_all "$start && { setsid nohup env $env bash launch/local.sh$args >>\"$log\" 2>&1 </dev/null & }"
  else
    ssh_all "set -o pipefail; $start && env $env bash launch/local.sh$args 2>&1 | tee -a \"$log\""
  fi
}

do_logs() {
  local tail_flags="-n 100"
  $follow && tail_flags+=" -F"
  ssh_all "tail $tail_flags $REMOTE_DIR/logs/$name.\$(hostname).log" "$worker"
}

# Signals the evejax process itself, as a preemption would, so it saves a checkpoint.
do_stop() {
  local pidfile="$REMOTE_DIR/logs/$name.pid"
  ssh_all "if [ -f $pidfile ] && kill -TERM \"\$(cat $pidfile)\"; then echo \"\$(hostname): sent SIGTERM\"; else echo \"\$(hostname): no run to stop\"; fi" "$worker"
}

do_status() {
  if $queued; then
    run "${queued_resources[@]}" describe "$name" "${where[@]}"
  else
    run "${tpu_vm[@]}" describe "$name" "${where[@]}"
  fi
}

do_delete() {
  if $queued; then
    run "${queued_resources[@]}" delete "$name" "${where[@]}" --force --quiet
  else
    run "${tpu_vm[@]}" delete "$name" "${where[@]}" --quiet
  fi
}

case "$cmd" in
  all) do_create; do_copy; do_setup; do_run ;;
  *) "do_$cmd" ;;
esac
