#!/usr/bin/env bash
# Installs what the web chat's browser test (tests/server/test_web_chat.py) needs: Debian's
# chromium and chromium-driver. Idempotent and quiet: does nothing when both are installed,
# runs `apt-get update` at most once. Without root or apt-get it says so and exits 0, so the
# test skips (with its reason) rather than CI failing here.
set -euo pipefail

packages=(chromium chromium-driver)
missing=()
for package in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-browser: apt-get not found; not installing ${missing[*]} (the browser test will skip)" >&2
    exit 0
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo=(sudo -n)
    else
        echo "install-browser: not root; not installing ${missing[*]} (the browser test will skip)" >&2
        exit 0
    fi
fi

echo "install-browser: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
chromium --version 2>/dev/null || true
chromedriver --version
