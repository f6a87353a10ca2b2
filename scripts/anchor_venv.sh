# Sourced by the scripts that give a benchmark anchor a virtual environment of its own
# (setup_modelopt.sh, setup_inc.sh). A stamp file records what was installed, so a second run with the
# same pins returns at once; it is written only after the import check passes.

venv_ready() {  # VENV WANT CHECK: VENV holds exactly WANT and CHECK (python code) runs
  [[ -f "$1/.onnxq-setup" && "$(cat "$1/.onnxq-setup")" == "$2" ]] && "$1/bin/python" -c "$3" >/dev/null 2>&1
}

venv_create() {  # VENV: make it with $PYTHON (default python3) unless it exists
  [[ -x "$1/bin/python" ]] || "${PYTHON:-python3}" -m venv "$1"
}

venv_pip() {  # VENV ARGS...: quiet pip install, dropping only the notice about this machine's absent local index folders
  local venv=$1
  shift
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

venv_stamp() {  # VENV WANT CHECK: fail here, not mid-benchmark, if CHECK does not import; then stamp
  "$1/bin/python" -W ignore -c "$3"
  echo "$2" >"$1/.onnxq-setup"
}
