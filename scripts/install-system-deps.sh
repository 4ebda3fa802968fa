#!/usr/bin/env bash
# System packages the test suite uses: bubblewrap (sandbox isolation) and Chromium (playground test).
# Installs them with apt-get when run as root on Debian/Ubuntu; elsewhere prints what to install.
# Never fatal: the tests that need a missing package skip with a reason.
set -u
missing=()
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]} with apt-get"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}") >/dev/null \
        || echo "warning: could not install ${missing[*]}; the tests that need them will skip" >&2
else
    echo "warning: please install ${missing[*]} (e.g. 'sudo apt-get install ${missing[*]}'); the tests that need them will skip" >&2
fi
exit 0
