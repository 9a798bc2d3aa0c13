# bash completion for cbt, the changed block tracking tool (installed as
# share/bash-completion/completions/cbt). Subcommands come from `cbt --help`,
# a subcommand's options from `cbt SUBCOMMAND --help`, so they never drift.
# Google's Bigtable cbt (same name) does not answer --version this way: then
# nothing is completed here.
_cbt() {
  local cur prev words cword
  _init_completion 2>/dev/null || {
    cur=${COMP_WORDS[COMP_CWORD]}; prev=${COMP_WORDS[COMP_CWORD-1]}
    words=("${COMP_WORDS[@]}"); cword=$COMP_CWORD
  }
  COMPREPLY=()
  local cbt=${words[0]}
  "$cbt" --version 2>/dev/null | grep -q 'changed block tracking' || return 0
  local i sub=
  for ((i = 1; i < cword; i++)); do
    case ${words[i]} in
      -*) ;;
      *) sub=${words[i]}; break ;;
    esac
  done
  if [[ -z $sub ]]; then
    if [[ $cur == -* ]]; then
      COMPREPLY=($(compgen -W '-v --verbose -h --help --version' -- "$cur"))
    else
      COMPREPLY=($(compgen -W "$("$cbt" --help 2>/dev/null |
        awk '/^Subcommands:/{on=1; next} on && /^  [a-z]/{print $1} on && /^$/{on=0}')" -- "$cur"))
    fi
    return 0
  fi
  case $prev in
    --socket|--dir|--data-file|--disk|--container|-b|--nbd-socket)
      COMPREPLY=($(compgen -f -- "$cur")); return 0 ;;
  esac
  if [[ $cur == -* ]]; then
    COMPREPLY=($("$cbt" "$sub" --help 2>/dev/null |
      grep -oE '(^|[ ,[])--?[a-zA-Z][a-zA-Z0-9-]*' | tr -d ' ,[' | sort -u |
      grep -E "^$(printf '%s' "$cur" | sed 's/[][\.*^$]/\\&/g')"))
  else
    COMPREPLY=($(compgen -f -- "$cur"))
  fi
}
complete -F _cbt cbt
