# Sourced by the launchers: sets PYTHON to the first interpreter that imports torch and scaling.
# Order: $PYTHON if the user set it (and nothing else then), the checkout's .venv (what `make`
# creates, see the README), the active virtualenv or conda env, then python and python3 on PATH.
find_python() {
  local c candidates
  if [ -n "${PYTHON:-}" ]; then
    candidates=("$PYTHON")
  else
    candidates=("$PWD/.venv/bin/python" ${VIRTUAL_ENV:+"$VIRTUAL_ENV/bin/python"}
                ${CONDA_PREFIX:+"$CONDA_PREFIX/bin/python"} python python3)
  fi
  for c in "${candidates[@]}"; do
    if command -v "$c" > /dev/null 2>&1 && "$c" -c "import torch, scaling" > /dev/null 2>&1; then
      PYTHON=$(command -v "$c")
      return 0
    fi
  done
  echo "error: no Python here imports torch and scaling (tried ${candidates[*]} in $PWD): run make install" \
       "(creates .venv) or set PYTHON=/path/to/python" >&2
  return 2
}
