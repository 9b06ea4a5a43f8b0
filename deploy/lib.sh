# Shared by deploy/*/run-pair (sourced, not run): messages, the project's tools, the token.
# The caller sets PAIR (its name, for messages) and REPO (the checkout's root).

log() { echo "$PAIR [${SECONDS}s]: $*" >&2; }
die() { log "error: $*"; exit 1; }

# project_bin: the directory holding this project's `postcopy` and `vmm`. An installed project
# (on PATH) is used as it is; else make's virtual environment, created or updated here.
project_bin() {
  local found
  if found=$(command -v postcopy) && command -v vmm >/dev/null; then
    dirname "$found"
    return
  fi
  log "postcopy is not on PATH: using make's virtual environment (make .venv/.installed)"
  make -s -C "$REPO" .venv/.installed >&2 || die "make .venv/.installed failed"
  echo "$REPO/.venv/bin"
}

# project_python BIN: the Python that runs the project's `postcopy` (its script's interpreter).
project_python() { sed -n '1s/^#! *//p' "$1/postcopy"; }

# check_flags VCPUS FAULT_MODE: refuse bad settings at once, before the host's tools are
# looked for or anything is made.
check_flags() {
  [[ $1 =~ ^[1-9][0-9]*$ ]] || die "--vcpus wants a positive count, got '$1'"
  [[ $2 =~ ^(exit|classic|auto)$ ]] || die "--fault-mode wants exit, classic or auto, got '$2'"
}

# check_mem MEM PYTHON: the guest size, read by the project's own parser (so once its Python
# is known), still before anything is made.
check_mem() {
  "$2" -c 'import sys; from vmm.memory import parse_size; parse_size(sys.argv[1])' "$1" 2>/dev/null \
    || die "--mem wants a size such as 256M, got '$1'"
}

# new_token FILE: a fresh migration token, readable by its owner only.
new_token() {
  (umask 077 && head -c 32 /dev/urandom | base64 | tr -d '\n=+/' >"$1")
}

# report_role: which role of deploy/roles prints the report.
report_role() { "$REPO/deploy/roles" report-role; }

# show_logs FILE...: the last lines of each log, after a failure.
show_logs() {
  local f
  for f in "$@"; do
    [[ -s $f ]] || continue
    log "--- last lines of $(basename "$f") ---"
    tail -n 20 "$f" >&2
  done
}
