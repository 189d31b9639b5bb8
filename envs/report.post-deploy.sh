#!/usr/bin/env bash
# Snakemake (--sdm conda) runs this once inside the freshly created env, in the working directory,
# which must be the project root: install cll itself (its dependencies come from the env file).
# Not tested here: conda is not available on this project's machines.
set -euo pipefail
pip install --no-deps -e .
