#!/usr/bin/env bash
# Install what omni-demo needs on a fresh Debian/Ubuntu machine: system packages, then Python ones.
#   bash scripts/setup.sh          # to run the app
#   bash scripts/setup.sh --dev    # to run the tests too (adds Chromium, espeak-ng, pytest, Playwright, axe-core)
set -euo pipefail
cd "$(dirname "$0")/.."

system=(ffmpeg)
python_reqs=(-r requirements.txt)
if [[ "${1:-}" == "--dev" ]]; then
  system+=(chromium espeak-ng sox jq)
  python_reqs=(-r requirements-dev.txt)
fi

missing=()
for package in "${system[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if (( ${#missing[@]} )); then
  echo "installing Debian packages: ${missing[*]}"
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore "${python_reqs[@]}"

if [[ "${1:-}" == "--dev" ]]; then  # the browser tests' accessibility check (axe-core, from the npm registry)
  npm install --silent --no-save --no-audit --no-fund --prefix .npm axe-core@4.14.1 >/dev/null
fi
