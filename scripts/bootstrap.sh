#!/usr/bin/env bash
# Create the project's virtual environment. torch goes first, pinned by constraints.txt, so that no
# later requirement swaps it for another build (on a CPU machine the pinned file is the CPU build).
# The rest comes at the versions of requirements.lock, so every machine tests the same packages.
set -euo pipefail
venv=${1:-.venv}
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q -c constraints.txt -c requirements.lock torch
"$venv/bin/pip" install -q -c constraints.txt -c requirements.lock -e ".[dev]"
