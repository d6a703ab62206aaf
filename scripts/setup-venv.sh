#!/usr/bin/env bash
# Creates .venv at the repo root with the pinned, tested torch stack and this
# package installed editable with all extras. Re-running is cheap: a stamp file
# records what was installed, and nothing is reinstalled while it matches.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv"
stamp="$venv/.lora_anywhere-setup"
# Bump this when the pins below or the extras in pyproject.toml change.
want="v1 torch==2.9.1 torchvision==0.24.1 torchaudio==2.9.1 $(sha1sum "$root/pyproject.toml" | cut -c1-12)"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] creating $venv (first run: downloads the torch stack, a few minutes)" >&2
python3 -m venv "$venv"
py="$venv/bin/python"
# The machine-wide pip constraint file caps torch at the versions on disk; our pins
# are below that cap, so it can stay.
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q torch==2.9.1 torchvision==0.24.1
"$py" -m pip install -q torch==2.9.1 torchaudio==2.9.1
"$py" -m pip install -q -e "$root[all,dev]"
echo "$want" > "$stamp"
echo "[setup] done" >&2
