#!/usr/bin/env bash
# One entry point on any machine with python3 (>= 3.10) and a package registry:
# make .venv at the repo root if missing, install evejax into it (only when
# setup.cfg or the extras changed), then run a command.
#
#   bash launch/local.sh test [pytest args...]    the test suite (CPU, 8 fake devices)
#   bash launch/local.sh demo [demo args...]      `evejax demo`, exports to PyTorch
#   bash launch/local.sh setup                    install only
#   bash launch/local.sh SUBCOMMAND [args...]     `evejax SUBCOMMAND args...`, e.g. train
#
# Environment: EVEJAX_EXTRAS=tpu,... adds pip extras (launch/tpu_vm.sh sets
# tpu); PYTHON is the interpreter that makes the venv (default python3);
# EVEJAX_PIDFILE, if set, receives the pid of the evejax process.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
# A bare `torch` resolves to the multi-GB CUDA build; the pin selects the CPU wheel.
TORCH_PIN="torch==2.13.0"

die() { echo "local.sh: error: $*" >&2; exit 1; }
say() { echo "local.sh: $*" >&2; }

usage() {
  sed -n '2,/^[^#]/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
}

make_venv() {
  [[ -x "$VENV/bin/python" ]] && return
  local py="${PYTHON:-python3}"
  command -v "$py" >/dev/null || die "'$py' not found: install Python >= 3.10 (or set PYTHON)"
  "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "$("$py" -V 2>&1) is too old: evejax needs Python >= 3.10 (set PYTHON to a newer one)"
  say "creating $VENV"
  if ! "$py" -m venv "$VENV"; then
    rm -rf "$VENV"
    die "'$py -m venv' failed (on Debian/Ubuntu: sudo apt-get install python3-venv)"
  fi
}

# Installs `pip install -e .[extras]` unless a stamp for these extras records the
# current setup.cfg hash, so a re-run costs one hash.
install() {
  local extras="$1"
  local stamp="$VENV/.evejax-installed-${extras:-base}"
  local -a req=(".")
  [[ -n "$extras" ]] && req=(".[$extras]")
  # -e applies to the first requirement only; the pin rides along.
  [[ ",$extras," == *,torch,* ]] && req+=("$TORCH_PIN")
  local want
  want="$("$VENV/bin/python" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$ROOT/setup.cfg") ${req[*]}"
  if [[ -f "$stamp" && "$(<"$stamp")" == "$want" ]]; then
    return
  fi
  say "installing evejax (${req[*]}) into $VENV"
  cd "$ROOT"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip || die "could not upgrade pip in $VENV"
  "$VENV/bin/python" -m pip install -e "${req[@]}" \
    || die "pip install -e ${req[*]} failed (see pip's message above)"
  cd - >/dev/null
  printf '%s\n' "$want" >"$stamp"
}

# join_extras "torch,test" "tpu,torch" -> torch,test,tpu
join_extras() {
  local IFS=, p
  local -a parts=()
  # shellcheck disable=SC2048  # unquoted on purpose: IFS=, splits each argument at its commas
  for p in $*; do
    [[ ",${parts[*]}," == *",$p,"* ]] || parts+=("$p")
  done
  echo "${parts[*]}"
}

if [[ $# -eq 0 || "$1" == -h || "$1" == --help ]]; then
  usage
  [[ $# -gt 0 ]] && exit 0
  exit 2
fi
cmd="$1"
shift

case "$cmd" in
  test) base="torch,test,tpu" ;;
  demo) base="torch" ;;
  *) base="" ;;
esac

make_venv
install "$(join_extras "$base" "${EVEJAX_EXTRAS:-}")"

# launch/tpu_vm.sh reads this to stop a run; exec keeps the pid.
if [[ -n "${EVEJAX_PIDFILE:-}" ]]; then
  echo "$$" >"$EVEJAX_PIDFILE"
fi
case "$cmd" in
  setup) say "ready: $VENV/bin/evejax" ;;
  test) cd "$ROOT" && exec "$VENV/bin/python" -m pytest -q -n auto --dist loadfile tests "$@" ;;
  *) exec "$VENV/bin/evejax" "$cmd" "$@" ;;
esac
