# Activates the Python environment vwlmm runs in (sourced by cluster/slurm/*.sbatch).
#
# Slurm steps inherit the batch script's environment, so activating once here reaches every
# rank and every Ray process on every node, provided the environment sits on a filesystem all
# nodes mount. First match wins:
#   VWLMM_ENV_HOOK=<file>   source this file: your site's `module load ...`, `conda activate ...`
#                           or anything else (keeps site paths out of the repository);
#   VWLMM_VENV=<dir>        source <dir>/bin/activate;
#   VWLMM_CONDA_ENV=<name>  `conda activate <name>` (conda must already be initialised);
#   <repo>/.venv            the virtualenv `make venv` creates, when present;
#   VWLMM_ENV=none          (or none of the above) use whatever `python` is on PATH, e.g.
#                           inside a container image (cluster/container/Dockerfile).
# Needs VWLMM_ROOT (the repository) set by the caller.

if [[ ${VWLMM_ENV:-} == none ]]; then
  :
elif [[ -n ${VWLMM_ENV_HOOK:-} ]]; then
  [[ -r $VWLMM_ENV_HOOK ]] || { echo "VWLMM_ENV_HOOK=$VWLMM_ENV_HOOK is not a readable file" >&2; exit 2; }
  # shellcheck disable=SC1090
  source "$VWLMM_ENV_HOOK"
elif [[ -n ${VWLMM_VENV:-} ]]; then
  [[ -r $VWLMM_VENV/bin/activate ]] || { echo "VWLMM_VENV=$VWLMM_VENV has no bin/activate" >&2; exit 2; }
  # shellcheck disable=SC1091
  source "$VWLMM_VENV/bin/activate"
elif [[ -n ${VWLMM_CONDA_ENV:-} ]]; then
  conda activate "$VWLMM_CONDA_ENV"
elif [[ -r $VWLMM_ROOT/.venv/bin/activate ]]; then
  # shellcheck disable=SC1091
  source "$VWLMM_ROOT/.venv/bin/activate"
fi
# Find the repository's packages even when the environment has no editable install of it.
export PYTHONPATH="$VWLMM_ROOT${PYTHONPATH:+:$PYTHONPATH}"
