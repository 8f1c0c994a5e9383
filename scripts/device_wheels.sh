#!/usr/bin/env bash
# Wheels for the GPU machine (no network there; torch, triton and transformers are installed): fla-core and the
# server's packages that its image lacks, downloaded here into .whl/ (ignore it: echo /.whl/ >> .git/info/exclude).
# On the GPU machine, from the repo root:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  fla-core==0.6.0 fastapi==0.165.0 uvicorn==0.55.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 \
  annotated-types typing-inspection sniffio opentelemetry-api==1.45.3 typing-extensions
ls .whl
