# Shared by the launch scripts (sourced, not run). Parses [--dry-run] CONFIG WORKDIR [EXTRA FLAGS...]
# into DRY_RUN, CONFIG, WORKDIR and EXTRA (an array), after the script's own --name=value options,
# which the caller handles through parse_option.

DRY_RUN=0
POSITIONAL=()
EXTRA=()

# usage_error MESSAGE: print the script's usage to stderr and exit 2.
usage_error() {
  echo "error: $1" >&2
  echo "usage: $USAGE" >&2
  exit 2
}

# parse_args "$@": fills DRY_RUN, CONFIG, WORKDIR, EXTRA; script options go to parse_option NAME VALUE.
parse_args() {
  while (($#)); do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      -h|--help) echo "usage: $USAGE"; exit 0 ;;
      --config.*|--compilation_cache=*|--distributed=*|--cpu_devices=*) EXTRA+=("$1") ;;
      --*=*)
        if ! parse_option "${1%%=*}" "${1#*=}"; then usage_error "unknown option $1"; fi ;;
      --*) usage_error "unknown option $1 (options take --name=value)" ;;
      *)
        if ((${#POSITIONAL[@]} < 2)); then POSITIONAL+=("$1"); else EXTRA+=("$1"); fi ;;
    esac
    shift
  done
  if ((${#POSITIONAL[@]} < 2)); then usage_error "CONFIG and WORKDIR are required"; fi
  CONFIG="${POSITIONAL[0]}"
  WORKDIR="${POSITIONAL[1]}"
}

# quote WORD...: the words as a shell would need them, bare where no quoting is needed.
quote() {
  local out=() word
  for word in "$@"; do
    if [[ "$(printf '%q' "$word")" == "$word" ]]; then out+=("$word"); else out+=("${word@Q}"); fi
  done
  echo "${out[*]}"
}

# train_args: fills TRAIN (an array): the python command every process runs.
train_args() {
  TRAIN=(python -m jaxrecon.main "--config=$CONFIG" "--workdir=$WORKDIR" "${EXTRA[@]+"${EXTRA[@]}"}")
}

# train_command: the same, as one shell-quoted line.
train_command() {
  train_args
  quote "${TRAIN[@]}"
}

# run CMD...: print the command; run it unless --dry-run.
run() {
  echo "+ $(quote "$@")"
  if ((DRY_RUN)); then return 0; fi
  "$@"
}
