#!/usr/bin/env bash
# Installs the plugins into an insightface checkout's recognition/arcface_torch.
#
#   ./install.sh INSIGHTFACE_DIR              dependencies, patches, plugins link, configs
#   ./install.sh --no-deps INSIGHTFACE_DIR    the same without pip
#   ./install.sh --deps-only                  dependencies only (tests, demo, benchmarks)
#   ./install.sh --uninstall INSIGHTFACE_DIR  restores every host file byte for byte
#   ./install.sh --uninstall --deps-only      removes the mxnet import hook from the environment
#
# PYTHON selects the interpreter whose environment receives the dependencies (default python3).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
MANIFEST_NAME=".arcface-plugins-manifest"
deps=1; deps_only=0; mode=install; host=""

die() { echo "install.sh: $*" >&2; exit 1; }
usage() { sed -n '2,/^[^#]/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --no-deps) deps=0 ;;
    --deps-only) deps_only=1 ;;
    --uninstall) mode=uninstall ;;
    -h|--help) usage 0 ;;
    -*) echo "install.sh: unknown option $1" >&2; usage 2 ;;
    *) [ -z "$host" ] || die "one INSIGHTFACE_DIR expected, got '$host' and '$1'"; host="$1" ;;
  esac
  shift
done

# The dependencies, in three pip runs: requirements.txt and requirements-host.txt (--deps-only: and
# requirements-test.txt) under constraints/pyX.Y.txt, the set resolved for that Python; mxnet 1.9.1
# without its declared dependencies (its numpy<2 would hold numpy and everything built on it back, and
# no numpy < 2 has a wheel for Python 3.13); mxnet-compat-hook (mxnet_hook/), which applies
# plugins/compat.py to every `import mxnet` in the environment.
python_version() {
  "$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null \
    || die "cannot run '$PYTHON': set PYTHON to a Python 3.10 to 3.13 interpreter"
}

install_deps() {
  local ver cons reqs build out
  ver=$(python_version)
  cons="$REPO/constraints/py$ver.txt"
  [ -f "$cons" ] || die "Python $ver is not supported: there is no constraints/py$ver.txt; use Python 3.10, 3.11, 3.12 or 3.13 (e.g. PYTHON=python3.13 ./install.sh ...)"
  reqs=(-r "$REPO/requirements.txt" -r "$REPO/requirements-host.txt")
  [ "$mode" = deps ] && reqs+=(-r "$REPO/requirements-test.txt")
  echo "install.sh: installing dependencies with Python $ver (constraints/py$ver.txt)"
  "$PYTHON" -m pip install "${reqs[@]}" -c "$cons"
  "$PYTHON" -m pip install --no-deps -r "$REPO/requirements-mxnet.txt" -c "$cons"
  # built from a copy, so that the checkout stays as it is (and may be read-only)
  build=$(mktemp -d) || die "cannot make a temporary folder to build mxnet-compat-hook"
  out=$(cp -r "$REPO/mxnet_hook" "$build/mxnet_hook" 2>&1 && mkdir "$build/plugins" && cp "$REPO/plugins/compat.py" "$build/plugins/" 2>&1) \
    || { rm -rf "$build"; die "cannot copy mxnet_hook to $build ($out)"; }
  "$PYTHON" -m pip install --no-deps --no-build-isolation --force-reinstall "$build/mxnet_hook" || { rm -rf "$build"; exit 1; }
  rm -rf "$build"
}

# what install_deps added that is this project's own: the import hook (the packages stay)
uninstall_deps() {
  python_version >/dev/null
  if "$PYTHON" -m pip show -q mxnet-compat-hook >/dev/null 2>&1; then
    "$PYTHON" -m pip uninstall -y -q mxnet-compat-hook
    echo "install.sh: removed mxnet-compat-hook from $("$PYTHON" -c 'import sys; print(sys.prefix)')"
  else
    echo "install.sh: mxnet-compat-hook is not installed for $PYTHON; nothing to do"
  fi
}

if [ "$deps_only" = 1 ]; then
  if [ "$mode" = uninstall ]; then uninstall_deps; else mode=deps; install_deps; fi
  exit 0
fi
[ -n "$host" ] || usage 2

AT="$host/recognition/arcface_torch"
[ -f "$AT/train_v2.py" ] || die "$AT/train_v2.py not found: INSIGHTFACE_DIR must be the root of an insightface checkout"
AT="$(cd "$AT" && pwd)"
MANIFEST="$AT/$MANIFEST_NAME"
PATCHES=("$REPO"/patches/*.patch)
STAGE_NAME=".arcface-plugins-stage"

# Every change is made in two steps: new contents are staged in $STAGE (inside arcface_torch, so that
# renames stay on one filesystem), then committed by renames; a failure or an interruption during
# the commit renames everything back. The stage is removed on exit whatever happens.
STAGE=""; committing=0; keep_stage=0
j_kind=(); j_target=(); j_saved=()

# the system's reason at the end of a tool's error message ("... : Operation not permitted")
reason() { local r="${1##*$'\n'}"; r="${r##*: }"; printf '%s' "${r:-unknown error}"; }

rollback() {
  local i saved target
  for ((i = ${#j_kind[@]} - 1; i >= 0; i--)); do
    target="${j_target[$i]}"; saved="${j_saved[$i]}"
    case "${j_kind[$i]}" in
      create) rm -f "$target" 2>/dev/null || { echo "install.sh: could not remove $target while rolling back" >&2; keep_stage=1; } ;;
      *) # a step cut short before its rename left the target as it was (the backup is the same file)
         if { [ -e "$saved" ] || [ -L "$saved" ]; } && ! [ "$saved" -ef "$target" ]; then
           mv -fT "$saved" "$target" 2>/dev/null \
             || { echo "install.sh: could not restore $target while rolling back; the original is $saved" >&2; keep_stage=1; }
         fi ;;
    esac
  done
  committing=0
}

fail() {
  local msg="$*"
  [ "$committing" = 1 ] && rollback
  [ "$keep_stage" = 1 ] || msg="$msg. Nothing was changed."
  echo "install.sh: $msg" >&2
  exit 1
}

on_exit() {
  local rc=$?
  if [ "$committing" = 1 ]; then rollback; echo "install.sh: stopped before the end; the changes made so far were undone" >&2; fi
  if [ -n "$STAGE" ] && [ "$keep_stage" = 0 ]; then rm -rf "$STAGE"; fi
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT; trap 'exit 143' TERM; trap 'exit 129' HUP
trap '' XFSZ  # a file size limit makes writes fail (and say so) instead of killing the tools

new_stage() {
  local d out pid
  # stages of runs that were killed (their process is gone) are removed
  for d in "$AT/$STAGE_NAME".*; do
    [ -d "$d" ] || continue
    pid="${d#"$AT/$STAGE_NAME."}"; pid="${pid%%.*}"
    kill -0 "$pid" 2>/dev/null || rm -rf "$d"
  done
  out=$(mktemp -d "$AT/$STAGE_NAME.$$.XXXXXX" 2>&1) || fail "cannot write in $AT ($(reason "$out"))"
  STAGE="$out"
}

# stage_copy SRC NAME: copies SRC (mode included) into the stage as NAME
stage_copy() {
  local out
  out=$(cp -p "$1" "$STAGE/$2" 2>&1) || fail "cannot stage a copy of $1 in $AT ($(reason "$out"))"
}

# stage_backup TARGET NAME: a hard link to TARGET's present content, put back if the commit fails
stage_backup() {
  local out
  [ -w "$1" ] || fail "$1 is not writable; make it writable (chmod, chattr -i) and run again"
  out=$(ln "$1" "$STAGE/$2" 2>&1) || fail "cannot replace $1 ($(reason "$out")); make it writable and run again"
}

unjournal() { unset 'j_kind[-1]' 'j_target[-1]' 'j_saved[-1]'; }  # a rename that failed changed nothing

# commit steps; each is journalled before it is made, so that an interruption rolls it back too
put() {  # put SRC TARGET [BACKUP]: SRC replaces TARGET (BACKUP holds its old content) or creates it
  local out
  j_kind+=("$([ -n "${3:-}" ] && echo replace || echo create)"); j_target+=("$2"); j_saved+=("${3:-}")
  out=$(mv -fT "$1" "$2" 2>&1) || { unjournal; fail "cannot write $2 ($(reason "$out"))"; }
}
take() {  # take TARGET NAME: moves TARGET into the stage (deleted on success)
  local out
  j_kind+=(remove); j_target+=("$1"); j_saved+=("$STAGE/$2")
  out=$(mv -fT "$1" "$STAGE/$2" 2>&1) || { unjournal; fail "cannot remove $1 ($(reason "$out"))"; }
}

sha() { sha256sum "$1" | cut -d' ' -f1; }

# state of one host file (or of FILE, a staged copy of it): pristine, patched or modified
file_state() {
  local path="$1" sum
  sum=$(sha "${2:-$AT/$path}")
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

# stage_patched FILE PATCH [-R]: the patched (or, with -R, restored) FILE, checked against host.sha256
stage_patched() {
  local f="$1" p="$2" want out
  want=$([ "${3:-}" = -R ] && echo pristine || echo patched)
  stage_copy "$AT/$f" "$f.new"
  out=$(patch -s -f ${3:-} --no-backup-if-mismatch -r - "$STAGE/$f.new" < "$p" 2>&1) \
    || fail "cannot apply $p to a copy of $AT/$f ($(reason "$out"))"
  [ "$(file_state "$f" "$STAGE/$f.new")" = "$want" ] \
    || fail "$p does not give the $want $AT/$f that patches/host.sha256 expects"
  stage_backup "$AT/$f" "$f.old"
}

our_configs() { (cd "$REPO/configs" && ls -1 ./*.py | sed 's|^\./||'); }

# The manifest lists what install.sh added: "link:plugins" and "config:NAME SHA256" (the content it
# wrote). Manifests of older installs list "config:NAME" alone.
manifest_sum() {  # the recorded sha256 of config NAME; "-" when listed without one; empty when not listed
  [ -f "$MANIFEST" ] || return 0
  awk -v n="config:$1" '$1 == n { print ($2 == "" ? "-" : $2); exit }' "$MANIFEST"
}

# a recipe is ours while it holds what install.sh wrote (older manifests: this project's recipe)
recipe_is_ours() {
  local c="$1" rec="$2" have
  have=$(sha "$AT/configs/$c")
  if [ "$rec" = - ]; then
    [ -f "$REPO/configs/$c" ] && [ "$have" = "$(sha "$REPO/configs/$c")" ]
  else
    [ "$have" = "$rec" ]
  fi
}

need_dir() { [ -w "$1" ] || fail "$1 is not writable; make it writable (chmod, chattr -i) and run again"; }

if [ "$mode" = uninstall ]; then
  [ -f "$MANIFEST" ] || die "$MANIFEST not found: the plugins are not installed in $AT"
  check_host ""
  need_dir "$AT"
  new_stage
  steps=()
  for p in "${PATCHES[@]}"; do
    f="$(basename "$p" .patch)"
    if [ "$(file_state "$f")" = patched ]; then stage_patched "$f" "$p" -R; steps+=("put:$f"); fi
  done
  kept=()
  while read -r entry _; do
    case "$entry" in
      config:*)
        c="${entry#config:}"
        [ -f "$AT/configs/$c" ] || continue
        if recipe_is_ours "$c" "$(manifest_sum "$c")"; then need_dir "$AT/configs"; steps+=("take:$c"); else kept+=("$c"); fi ;;
      link:plugins) [ -L "$AT/plugins" ] && steps+=("take:plugins") ;;
    esac
  done < "$MANIFEST"
  committing=1
  for s in "${steps[@]}"; do
    case "$s" in
      put:*) f="${s#put:}"; put "$STAGE/$f.new" "$AT/$f" "$STAGE/$f.old" ;;
      take:plugins) take "$AT/plugins" plugins.old ;;
      take:*) take "$AT/configs/${s#take:}" "config.${s#take:}.old" ;;
    esac
  done
  take "$MANIFEST" manifest.old
  committing=0
  for c in "${kept[@]}"; do
    echo "install.sh: kept $AT/configs/$c: it was changed after install (delete it yourself if it is not needed)"
  done
  echo "install.sh: uninstalled from $AT"
  exit 0
fi

# refuse before touching anything
check_host ""
if { [ -e "$AT/plugins" ] || [ -L "$AT/plugins" ]; } && [ "$(readlink "$AT/plugins" || true)" != "$REPO/plugins" ]; then
  die "$AT/plugins exists and is not this project's link; move it away and run again. Nothing was changed."
fi
entries=("link:plugins")
for c in $(our_configs); do
  rec=$(manifest_sum "$c")
  if [ -e "$AT/configs/$c" ]; then
    [ -n "$rec" ] || die "$AT/configs/$c is a host file with the name of one of this project's configs; nothing was overwritten or changed."
    recipe_is_ours "$c" "$rec" \
      || die "$AT/configs/$c was changed after install; move your version away and run again. Nothing was changed."
  fi
  entries+=("config:$c $(sha "$REPO/configs/$c")")
done
# recipes of an earlier install that this project no longer ships stay listed, for --uninstall
if [ -f "$MANIFEST" ]; then
  while read -r line; do
    c="${line#config:}"; c="${c%% *}"
    case "$line" in config:*) [ -f "$REPO/configs/$c" ] || entries+=("$line") ;; esac
  done < "$MANIFEST"
fi

[ "$deps" = 1 ] && install_deps

steps=()
for p in "${PATCHES[@]}"; do
  f="$(basename "$p" .patch)"
  [ "$(file_state "$f")" = pristine ] && steps+=("patch:$f:$p")
done
[ -L "$AT/plugins" ] || steps+=(link)
for c in $(our_configs); do
  cmp -s "$REPO/configs/$c" "$AT/configs/$c" 2>/dev/null || steps+=("config:$c")
done
manifest_changed=0
[ "$(printf '%s\n' "${entries[@]}")" = "$(cat "$MANIFEST" 2>/dev/null)" ] || manifest_changed=1
if [ ${#steps[@]} = 0 ] && [ "$manifest_changed" = 0 ]; then
  echo "install.sh: already installed in $AT; nothing to do"; exit 0
fi

need_dir "$AT"
new_stage
for s in "${steps[@]}"; do
  case "$s" in
    patch:*) s="${s#patch:}"; stage_patched "${s%%:*}" "${s#*:}" ;;
    link) out=$(ln -s "$REPO/plugins" "$STAGE/plugins" 2>&1) || fail "cannot create a link in $AT ($(reason "$out"))" ;;
    config:*)
      c="${s#config:}"
      need_dir "$AT/configs"
      stage_copy "$REPO/configs/$c" "config.$c"
      [ -e "$AT/configs/$c" ] && stage_backup "$AT/configs/$c" "config.$c.old" ;;
  esac
done
out=$(printf '%s\n' "${entries[@]}" 2>&1 > "$STAGE/manifest") || fail "cannot write in $AT ($(reason "$out"))"
[ -f "$MANIFEST" ] && stage_backup "$MANIFEST" manifest.old

# the manifest comes first: an install cut short by SIGKILL can still be undone with --uninstall
committing=1
put "$STAGE/manifest" "$MANIFEST" "$([ -f "$MANIFEST" ] && echo "$STAGE/manifest.old")"
for s in "${steps[@]}"; do
  case "$s" in
    patch:*) s="${s#patch:}"; f="${s%%:*}"; put "$STAGE/$f.new" "$AT/$f" "$STAGE/$f.old" ;;
    link) put "$STAGE/plugins" "$AT/plugins" ;;
    config:*) c="${s#config:}"; put "$STAGE/config.$c" "$AT/configs/$c" "$([ -e "$STAGE/config.$c.old" ] && echo "$STAGE/config.$c.old")" ;;
  esac
done
committing=0
if [ ${#steps[@]} -gt 0 ]; then echo "install.sh: installed into $AT"; else echo "install.sh: already installed in $AT; manifest updated"; fi
