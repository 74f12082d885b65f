#!/usr/bin/env bash
# Create the project's virtual environment. torch goes first, pinned by constraints.txt, so that no
# later requirement swaps it for another build (on a CPU machine the pinned file is the CPU build).
set -euo pipefail
venv=${1:-.venv}
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q -c constraints.txt torch
"$venv/bin/pip" install -q -c constraints.txt -e ".[dev]"
