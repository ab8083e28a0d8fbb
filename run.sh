#!/usr/bin/env bash
# The main job: set up .venv if needed, then run the streamtap demo on the embedded default model
# (SmolLM2-135M-Instruct; converted and cached on first use). Arguments go to `streamtap demo`,
# e.g. ./run.sh --out /tmp/demo.zarr --overwrite ; paths are relative to where you call it from.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$root/scripts/setup-env.sh"
exec "$root/.venv/bin/streamtap" demo "$@"
