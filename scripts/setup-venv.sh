#!/usr/bin/env bash
# Creates .venv at the repo root with the pinned, tested torch stack and this
# package installed editable with all extras. Re-running is cheap: a stamp file
# records what was installed, and nothing is reinstalled while it matches.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv"
stamp="$venv/.lora_anywhere-setup"
# Changes whenever pyproject.toml or the pinned versions in constraints.txt change.
want="v1 $(cat "$root/pyproject.toml" "$root/scripts/constraints.txt" | sha1sum | cut -c1-12)"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] creating $venv (first run: downloads the torch stack, a few minutes)" >&2
python3 -m venv "$venv"
py="$venv/bin/python"
# The machine-wide pip constraint file caps torch at the versions on disk; our pins
# are below that cap, so it can stay.
pins="$root/scripts/constraints.txt"
quiet() { "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
quiet "$py" -m pip install -q --upgrade pip
# torchaudio first pulls a torch of its own choosing unless torch is pinned with it.
quiet "$py" -m pip install -q -c "$pins" torch torchvision
quiet "$py" -m pip install -q -c "$pins" torch torchaudio
"$py" -m pip install -q -c "$pins" -e "$root[all,dev,docs]" 2>&1 | grep -v "^WARNING: Location" || true
"$py" -c "import torch, torchvision, torchaudio, lora_anywhere" || { echo "[setup] failed: see pip output above" >&2; exit 1; }
echo "$want" > "$stamp"
echo "[setup] done" >&2
