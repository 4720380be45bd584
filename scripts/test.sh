#!/usr/bin/env bash
# The README's test command: installs what the tests need on a fresh machine, then runs them.
# Step 1: timm needs torchvision, which only imports beside torch 2.14.1 here, so its tests run in a venv
#         of their own. Step 2: everything else, with torch 2.13.0 CPU, Triton's interpreter and transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
# The ASR recipe's tests synthesise speech with Debian's espeak-ng (they skip, saying so, if it cannot be installed).
command -v espeak-ng > /dev/null || { apt-get update -qq && apt-get install -y -qq espeak-ng > /dev/null; } \
    || echo "warning: espeak-ng could not be installed; the ASR data tests will skip"
TIMM_VENV="${TIMM_VENV:-/tmp/sigattn-timm-venv}"
[ -x "$TIMM_VENV/bin/python" ] || python3 -m venv "$TIMM_VENV"
"$TIMM_VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1 -e ".[timm]" pytest
"$TIMM_VENV/bin/python" -m pytest -q -p no:cacheprovider tests/integrations/test_timm.py
python3 -m pip install -q torch==2.13.0 -e ".[dev,hf]"
python3 -m pytest -q
