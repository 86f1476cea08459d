# Source me: ng_pip VENV ARGS... runs that venv's pip, leaving out this machine's notices about its
# absent local package indexes; pip's own messages and exit status are kept.
ng_pip() {
  local venv="$1"
  shift
  "$venv/bin/python" -m pip "$@" 2> >(grep -v '^WARNING: Location .* is ignored' >&2)
}
