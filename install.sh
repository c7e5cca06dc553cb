#!/usr/bin/env bash
# Installs the plugins into an insightface checkout's recognition/arcface_torch.
#
#   ./install.sh INSIGHTFACE_DIR              dependencies, patches, plugins link, configs
#   ./install.sh --no-deps INSIGHTFACE_DIR    the same without pip
#   ./install.sh --deps-only                  dependencies only (tests, demo, benchmarks)
#   ./install.sh --uninstall INSIGHTFACE_DIR  restores every host file byte for byte
#
# PYTHON selects the interpreter whose environment receives the dependencies (default python3).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
MANIFEST_NAME=".arcface-plugins-manifest"
deps=1; mode=install; host=""

die() { echo "install.sh: $*" >&2; exit 1; }
usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --no-deps) deps=0 ;;
    --deps-only) mode=deps ;;
    --uninstall) mode=uninstall ;;
    -h|--help) usage 0 ;;
    -*) echo "install.sh: unknown option $1" >&2; usage 2 ;;
    *) [ -z "$host" ] || die "one INSIGHTFACE_DIR expected, got '$host' and '$1'"; host="$1" ;;
  esac
  shift
done

install_deps() {
  # one resolver run: requirements.txt under constraints/pyX.Y.txt, the full set resolved for that Python
  local ver cons
  ver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) \
    || die "cannot run '$PYTHON': set PYTHON to a Python 3.10, 3.11 or 3.12 interpreter"
  cons="$REPO/constraints/py$ver.txt"
  [ -f "$cons" ] || die "Python $ver is not supported: there is no constraints/py$ver.txt; use Python 3.10, 3.11 or 3.12 (e.g. PYTHON=python3.12 ./install.sh ...)"
  echo "install.sh: installing dependencies with Python $ver (constraints/py$ver.txt)"
  "$PYTHON" -m pip install -r "$REPO/requirements.txt" -c "$cons"
}

[ "$mode" = deps ] && { install_deps; exit 0; }
[ -n "$host" ] || usage 2

AT="$host/recognition/arcface_torch"
[ -f "$AT/train_v2.py" ] || die "$AT/train_v2.py not found: INSIGHTFACE_DIR must be the root of an insightface checkout"
AT="$(cd "$AT" && pwd)"
MANIFEST="$AT/$MANIFEST_NAME"
PATCHES=("$REPO"/patches/*.patch)

# state of one host file: pristine, patched or modified
file_state() {
  local path="$1" sum
  sum=$(sha256sum "$AT/$path" | cut -d' ' -f1)
  awk -v s="$sum" -v p="$path" '$1 == s && $2 == p { print $3; found = 1 } END { if (!found) print "modified" }' \
    "$REPO/patches/host.sha256"
}

check_host() {
  local path state expect="$1"
  for path in $(awk '!/^#/ { print $2 }' "$REPO/patches/host.sha256" | sort -u); do
    [ -f "$AT/$path" ] || die "$AT/$path is missing; this plugin expects arcface_torch as of insightface commit 0159b24d"
    state=$(file_state "$path")
    if [ "$state" = modified ] || { [ -n "$expect" ] && [ "$state" != "$expect" ]; }; then
      die "$AT/$path differs from the content the patches expect ($state, wanted ${expect:-pristine or patched}); restore it (git checkout) and run again. Nothing was changed."
    fi
  done
}

our_configs() { (cd "$REPO/configs" && ls -1 ./*.py | sed 's|^\./||'); }

if [ "$mode" = uninstall ]; then
  [ -f "$MANIFEST" ] || die "$MANIFEST not found: the plugins are not installed in $AT"
  check_host ""
  for p in "${PATCHES[@]}"; do
    f="$(basename "$p" .patch)"
    if [ "$(file_state "$f")" = patched ]; then
      patch -s -R -p1 -d "$AT" --no-backup-if-mismatch < "$p"
    fi
  done
  while read -r line; do
    case "$line" in
      config:*) rm -f "$AT/configs/${line#config:}" ;;
      link:plugins) [ -L "$AT/plugins" ] && rm -f "$AT/plugins" ;;
    esac
  done < "$MANIFEST"
  rm -f "$MANIFEST"
  check_host pristine
  echo "install.sh: uninstalled from $AT"
  exit 0
fi

# refuse before touching anything
check_host ""
if [ -e "$AT/plugins" ] && [ "$(readlink "$AT/plugins" || true)" != "$REPO/plugins" ]; then
  die "$AT/plugins exists and is not this project's link; move it away and run again. Nothing was changed."
fi
for c in $(our_configs); do
  if [ -e "$AT/configs/$c" ] && ! grep -qx "config:$c" "$MANIFEST" 2>/dev/null; then
    die "$AT/configs/$c is a host file with the name of one of this project's configs; nothing was overwritten or changed."
  fi
done
for p in "${PATCHES[@]}"; do
  f="$(basename "$p" .patch)"
  if [ "$(file_state "$f")" = pristine ]; then
    patch -s --dry-run -p1 -d "$AT" < "$p" >/dev/null || die "$p does not apply to $AT/$f; nothing was changed."
  fi
done

[ "$deps" = 1 ] && install_deps

changed=0
for p in "${PATCHES[@]}"; do
  f="$(basename "$p" .patch)"
  if [ "$(file_state "$f")" = pristine ]; then
    patch -s -p1 -d "$AT" --no-backup-if-mismatch < "$p"; changed=1
  fi
done
if [ ! -e "$AT/plugins" ]; then ln -s "$REPO/plugins" "$AT/plugins"; changed=1; fi
entries=("link:plugins")
for c in $(our_configs); do
  if ! cmp -s "$REPO/configs/$c" "$AT/configs/$c" 2>/dev/null; then
    cp "$REPO/configs/$c" "$AT/configs/$c.tmp.$$" && mv "$AT/configs/$c.tmp.$$" "$AT/configs/$c"; changed=1
  fi
  entries+=("config:$c")
done
if [ "$(printf '%s\n' "${entries[@]}")" != "$(cat "$MANIFEST" 2>/dev/null)" ]; then
  printf '%s\n' "${entries[@]}" > "$MANIFEST.tmp.$$" && mv "$MANIFEST.tmp.$$" "$MANIFEST"
fi
for p in "${PATCHES[@]}"; do
  f="$(basename "$p" .patch)"
  [ "$(file_state "$f")" = patched ] || die "$AT/$f is not in the patched state after install"
done
if [ "$changed" = 1 ]; then echo "install.sh: installed into $AT"; else echo "install.sh: already installed in $AT; nothing to do"; fi
