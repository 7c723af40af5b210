#!/usr/bin/env bash
# CI for {{ cookiecutter.__distribution }}: a fresh virtual environment, an editable
# install with the test extra, then the tests (arguments are passed on to pytest).
#
# DER_SDK_SPEC chooses where der-sdk comes from (default: the package index), e.g.
#   DER_SDK_SPEC=../der-sdk bash ci.sh        # a source checkout
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv-ci
.venv-ci/bin/python -m pip install --quiet --upgrade pip
.venv-ci/bin/python -m pip install --quiet "${DER_SDK_SPEC:-der-sdk}"
.venv-ci/bin/python -m pip install --quiet -e ".[test]"
.venv-ci/bin/python -m pytest "$@"
