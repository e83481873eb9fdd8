#!/usr/bin/env bash
# Fetches the source of the installed fio (Debian's source package of the same version) and runs
# its ./configure, so that the ferroblk fio engine is built against the very headers (fio.h,
# ioengines.h, optgroup.h, config-host.h) of the fio that will load it. Idempotent: when the
# configured tree for the installed version is already there it returns at once.
#
#   usage: fio/fetch-headers.sh [DEST]     (default: out/fio-src, in the repository root)
# Prints the configured tree's path (what build.rs reads from FIO_SRC) on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-out/fio-src}

command -v fio >/dev/null || { echo "fetch-headers: fio is not installed (apt-get install fio)" >&2; exit 1; }
version=$(dpkg-query -W -f='${Version}' fio)
if [ -f "$dest/config-host.h" ] && [ "$(cat "$dest/.debian-version" 2>/dev/null)" = "$version" ]; then
  echo "$dest"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
command -v dpkg-source >/dev/null || { apt-get update -qq && apt-get install -y -qq dpkg-dev; }
# apt-get source needs a deb-src entry for the suite the installed fio comes from.
if ! grep -rqs '^Types:.*deb-src\|^deb-src ' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
  cat > /etc/apt/sources.list.d/ferroblk-deb-src.sources <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: $codename $codename-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  apt-get update -qq
fi

parent=$(dirname "$dest")
mkdir -p "$parent"
work=$(mktemp -d "$parent/.fio-src.XXXXXX")
trap 'rm -rf "$work"' EXIT
( cd "$work" && apt-get source -qq "fio=$version" >/dev/null 2>&1 ) \
  || ( apt-get update -qq && cd "$work" && apt-get source -qq "fio=$version" >/dev/null ) \
  || { echo "fetch-headers: apt-get source fio=$version failed" >&2; exit 1; }
tree=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'fio-*' | head -n 1)
[ -n "$tree" ] || { echo "fetch-headers: no fio-* tree in the source package" >&2; exit 1; }
# config-host.h is what ./configure writes: the feature macros fio itself was built with decide
# the layout of its structures (thread_data, io_u), so they must match the installed binary.
( cd "$tree" && ./configure >/dev/null ) || { echo "fetch-headers: fio's ./configure failed" >&2; exit 1; }
echo "$version" > "$tree/.debian-version"
rm -rf "$dest"
mv "$tree" "$dest"
echo "$dest"
