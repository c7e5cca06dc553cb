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
# INSTALL_LOCK_WAIT: seconds to wait for another run on the same host to end (default 10).
set -euo pipefail

# the project's folder, also when this script is run through a link to it
REPO="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)"
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

[ -f "$REPO/patches/host.sha256" ] && [ -d "$REPO/plugins" ] \
  || die "$REPO/patches/host.sha256 or $REPO/plugins not found: run the install.sh of a complete checkout of this project"
AT="$host/recognition/arcface_torch"
[ -f "$AT/train_v2.py" ] || die "$AT/train_v2.py not found: INSIGHTFACE_DIR must be the root of an insightface checkout"
AT="$(cd "$AT" && pwd)"
MANIFEST="$AT/$MANIFEST_NAME"
LOCK="$AT/.arcface-plugins-lock"
STAGE_NAME=".arcface-plugins-stage"
PATCHES=("$REPO"/patches/*.patch)

# One run at a time per host: the lock (flock on $LOCK) is held from before the first check to the
# end, and removed by its holder. A second run waits INSTALL_LOCK_WAIT seconds (default 10) for it, then
# refuses. Tools started by a run inherit the lock, so a run killed mid-step holds it until that
# step's rename is done.
#
# Every change is made in two steps: new contents are staged in $STAGE (inside arcface_torch, so that
# renames stay on one filesystem), then committed by renames listed beforehand in $STAGE/journal.
# Whether a step was made is read from the files (its staged file gone, or its target moved in), so
# the journal undoes a commit cut short at any point: by the run itself (a failure, a signal) or,
# after a SIGKILL, by the next run, which finds the stage under the lock. The journal is renamed
# journal.done once the commit is whole; a stage without a journal is only deleted.
STAGE=""; locked=0; lock_open=0; phase=run; sig=""; undo_tried=0; undo_failed=""

# INT, TERM and HUP stop a run at once until the commit begins; during the commit they are noted
# and the commit stops between two steps and is undone; while it is undone and the run cleans up,
# they are ignored, by the tools it runs too (a Ctrl-C reaches them as well).
on_signal() {
  [ -n "$sig" ] && return 0
  sig="$1"
  [ "$phase" = run ] && exit "$1"
  return 0
}
catch_signals() { trap 'on_signal 130' INT; trap 'on_signal 143' TERM; trap 'on_signal 129' HUP; }
# (a signal caught just before is reported by bash as a bad trap value once ignored: not shown)
hold_signals() { { trap '' INT TERM HUP; } 2>/dev/null; }
catch_signals
trap '' XFSZ  # a file size limit makes writes fail (and say so) instead of killing the tools

# the system's reason at the end of a tool's error message ("... : Operation not permitted")
reason() { local r="${1##*$'\n'}"; r="${r##*: }"; printf '%s' "${r:-unknown error}"; }

finish() { phase=hold; exit "$1"; }
die() { phase=hold; echo "install.sh: $*" >&2; exit 1; }

# undo STAGE: puts back every step of STAGE's journal that was made, last first; returns 1 with the
# first path it could not put back in $undo_failed (the journal stays for the next run)
undo() {
  local s="$1" i kind target name try out lines=()
  undo_failed=""
  [ -f "$s/journal" ] || return 0
  mapfile -t lines < "$s/journal"
  for ((i = ${#lines[@]} - 1; i >= 0; i--)); do
    IFS=$'\t' read -r kind target <<< "${lines[$i]}"
    name="${target//\//%}"
    for try in 1 2 3; do  # a tool killed by a Ctrl-C is run again
      case "$kind" in
        replace) # made: the new file is gone and the old one waits in the stage
          if [ -e "$s/$name.new" ] || ! [ -e "$s/$name.old" ]; then out=""; break; fi
          out=$(mv -fT "$s/$name.old" "$AT/$target" 2>&1) && break ;;
        create)
          if [ -e "$s/$name.new" ] || [ -L "$s/$name.new" ] || ! { [ -e "$AT/$target" ] || [ -L "$AT/$target" ]; }; then out=""; break; fi
          out=$(rm -f "$AT/$target" 2>&1) && break ;;
        remove)
          if ! { [ -e "$s/$name.old" ] || [ -L "$s/$name.old" ]; }; then out=""; break; fi
          out=$(mv -T "$s/$name.old" "$AT/$target" 2>&1) && break ;;
      esac
    done
    [ -z "$out" ] || { undo_failed="$AT/$target ($(reason "$out"))"; return 1; }
  done
  mv -T "$s/journal" "$s/journal.undone" 2>/dev/null || true
}

# undone WHAT DONE: undoes this run's commit and says WHAT went wrong, then DONE or what is left
undone() {
  undo_tried=1
  if undo "$STAGE"; then echo "install.sh: $1$2" >&2
  else echo "install.sh: $1; $undo_failed could not be put back yet: run install.sh again to undo the rest" >&2; fi
}

in_commit() { [ -n "$STAGE" ] && [ -f "$STAGE/journal" ]; }  # from the journal's rename to journal.done

on_exit() {
  local rc=$?
  phase=hold; hold_signals
  # stopped by an error the run did not foresee
  if [ "$undo_tried" = 0 ] && in_commit; then undone "stopped before the end" "; the changes made so far were undone"; fi
  if [ -n "$STAGE" ] && ! [ -f "$STAGE/journal" ]; then rm -rf "$STAGE"; fi
  # the lock file is removed by whoever holds the lock (a run stopped while taking it takes it now
  # if no other run holds it)
  if [ "$locked" = 1 ] || { [ "$lock_open" = 1 ] && flock -n 9 2>/dev/null; }; then
    if [ /dev/fd/9 -ef "$LOCK" ]; then rm -f "$LOCK"; fi
  fi
  exit "$rc"
}
trap on_exit EXIT

fail() {  # a failure before or during the commit: undo what was made, then one line
  phase=hold
  if [ -n "$sig" ]; then in_commit && stop; exit "$sig"; fi  # a tool killed by a Ctrl-C
  if in_commit; then hold_signals; undone "$*" ". Nothing was changed."; else echo "install.sh: $*. Nothing was changed." >&2; fi
  exit 1
}

need_dir() { [ -w "$1" ] || die "$1 is not writable; make it writable (chmod, chattr -i) and run again"; }

take_lock() {  # signals are noted while the lock is taken, so that a lock taken is always removed
  local n holder=""
  [[ "${INSTALL_LOCK_WAIT:-10}" =~ ^[0-9]{1,6}$ ]] \
    || die "INSTALL_LOCK_WAIT=$INSTALL_LOCK_WAIT is not a number of seconds; set it to one (default 10) and run again. Nothing was changed."
  need_dir "$AT"
  phase=hold
  for ((n = 0; ; n++)); do
    { exec 9<>"$LOCK"; } 2>/dev/null || die "cannot create the lock file $LOCK; make $AT writable and run again"
    lock_open=1
    if flock -n 9 2>/dev/null; then
      if [ /dev/fd/9 -ef "$LOCK" ]; then
        locked=1
        { printf '%s\n' "$$" >&9; } 2>/dev/null || true
        phase=run
        [ -z "$sig" ] || exit "$sig"
        return 0
      fi
      continue  # its holder removed it on leaving: lock the file there now
    fi
    [ -z "$sig" ] || exit "$sig"
    ((n < ${INSTALL_LOCK_WAIT:-10} * 10)) || break
    sleep 0.1 || true
  done
  read -r holder 2>/dev/null < "$LOCK" || true
  die "$LOCK is held by another install.sh run${holder:+ (pid $holder)} on this host; wait for it to finish and run again. Nothing was changed."
}

# stages of runs that did not end (a SIGKILL): this run holds the lock, so none of them is running
repair() {
  local d out
  phase=hold
  for d in "$AT/$STAGE_NAME".*; do
    [ -d "$d" ] && ! [ -L "$d" ] || continue
    if [ -f "$d/journal" ]; then
      hold_signals
      undo "$d" || die "cannot undo the unfinished changes of an earlier run kept in $d: $undo_failed could not be put back; make it writable and run again"
      echo "install.sh: undid the unfinished changes of an earlier run in $AT"
    fi
    out=$(rm -rf "$d" 2>&1) || die "cannot remove $d ($(reason "$out")); remove it and run again"
  done
  catch_signals
  phase=run
  [ -z "$sig" ] || exit "$sig"
}

new_stage() {
  local out
  STAGE="$AT/$STAGE_NAME.$$"
  out=$(mkdir "$STAGE" 2>&1) || fail "cannot write in $AT ($(reason "$out"))"
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

# The commit: JOURNAL lines "replace|create|remove<TAB>path in arcface_torch"; the stage holds
# NAME.new (replace, create) and NAME.old (replace: a hard link to the present file), NAME being the
# path with / as %. remove moves the file to NAME.old, deleted with the stage.
journal=()
plan() { journal+=("$1"$'\t'"$2"); }

commit() {
  local line kind target name out
  out=$(printf '%s\n' "${journal[@]}" 2>&1 > "$STAGE/journal.tmp") || fail "cannot write in $AT ($(reason "$out"))"
  phase=hold
  [ -z "$sig" ] || exit "$sig"
  # (a tool killed by a Ctrl-C may have done its rename: the files say)
  out=$(mv -T "$STAGE/journal.tmp" "$STAGE/journal" 2>&1) || in_commit || fail "cannot write in $AT ($(reason "$out"))"
  for line in "${journal[@]}"; do
    [ -z "$sig" ] || stop
    IFS=$'\t' read -r kind target <<< "$line"
    name="${target//\//%}"
    case "$kind" in
      replace|create) out=$(mv -fT "$STAGE/$name.new" "$AT/$target" 2>&1) || fail "cannot write $AT/$target ($(reason "$out"))" ;;
      remove) out=$(mv -T "$AT/$target" "$STAGE/$name.old" 2>&1) || fail "cannot remove $AT/$target ($(reason "$out"))" ;;
    esac
  done
  [ -z "$sig" ] || stop
  out=$(mv -T "$STAGE/journal" "$STAGE/journal.done" 2>&1) || [ -f "$STAGE/journal.done" ] \
    || fail "cannot write in $AT ($(reason "$out"))"
}

stop() { hold_signals; undone "stopped before the end" "; the changes made so far were undone"; exit "$sig"; }  # a signal came during the commit

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
# wrote). Manifests of older installs list "config:NAME" alone. Without a manifest (lost), the
# installed files are recognised by content: the patched files by patches/host.sha256, the link by
# its target, the recipes by this project's configs/.
manifest_sum() {  # the recorded sha256 of config NAME; "-" when listed without one; empty when not listed
  [ -f "$MANIFEST" ] || return 0
  awk -v n="config:$1" '$1 == n { print ($2 == "" ? "-" : $2); exit }' "$MANIFEST"
}

# a recipe is ours while it holds what install.sh wrote (not listed, or listed without a sha256:
# this project's recipe)
recipe_is_ours() {
  local c="$1" rec="$2" have
  have=$(sha "$AT/configs/$c")
  if [ -z "$rec" ] || [ "$rec" = - ]; then
    [ -f "$REPO/configs/$c" ] && [ "$have" = "$(sha "$REPO/configs/$c")" ]
  else
    [ "$have" = "$rec" ]
  fi
}

take_lock
repair

if [ "$mode" = uninstall ]; then
  check_host ""
  for p in "${PATCHES[@]}"; do
    f="$(basename "$p" .patch)"
    [ "$(file_state "$f")" = patched ] && plan replace "$f"
  done
  kept=()
  if [ -L "$AT/plugins" ]; then
    if grep -qx 'link:plugins' "$MANIFEST" 2>/dev/null || [ "$(readlink "$AT/plugins")" = "$REPO/plugins" ]; then
      plan remove plugins
    else
      kept+=("$AT/plugins: it links to $(readlink "$AT/plugins"), not to this project's $REPO/plugins, and no manifest lists it (remove it yourself if it is not needed)")
    fi
  fi
  names=$( { our_configs; if [ -f "$MANIFEST" ]; then sed -n 's/^config:\([^ ]*\).*/\1/p' "$MANIFEST"; fi; } | sort -u)
  for c in $names; do
    [ -f "$AT/configs/$c" ] || continue
    rec=$(manifest_sum "$c")
    if recipe_is_ours "$c" "$rec"; then
      need_dir "$AT/configs"; plan remove "configs/$c"
    elif [ -n "$rec" ]; then
      kept+=("$AT/configs/$c: it was changed after install (delete it yourself if it is not needed)")
    elif ! [ -f "$MANIFEST" ]; then
      kept+=("$AT/configs/$c: it differs from this project's recipe of that name and no manifest lists it (delete it yourself if it is your edit of the recipe)")
    fi
  done
  [ -f "$MANIFEST" ] && plan remove "$MANIFEST_NAME"
  if [ ${#journal[@]} = 0 ]; then
    for k in "${kept[@]}"; do echo "install.sh: kept $k"; done
    echo "install.sh: the plugins are not installed in $AT; nothing to do"; finish 0
  fi
  new_stage
  for line in "${journal[@]}"; do
    IFS=$'\t' read -r kind target <<< "$line"
    [ "$kind" = replace ] && stage_patched "$target" "$REPO/patches/$target.patch" -R
  done
  commit
  for k in "${kept[@]}"; do echo "install.sh: kept $k"; done
  echo "install.sh: uninstalled from $AT"
  finish 0
fi

# refuse before touching anything
check_host ""
if { [ -e "$AT/plugins" ] || [ -L "$AT/plugins" ]; } && [ "$(readlink "$AT/plugins" || true)" != "$REPO/plugins" ]; then
  [ -L "$AT/plugins" ] && grep -qx 'link:plugins' "$MANIFEST" 2>/dev/null \
    && die "$AT/plugins links to $(readlink "$AT/plugins"), an earlier install from a project that moved or another copy; run ./install.sh --uninstall $host first, then install again. Nothing was changed."
  die "$AT/plugins exists and is not this project's link; move it away and run again. Nothing was changed."
fi
entries=("link:plugins")
for c in $(our_configs); do
  rec=$(manifest_sum "$c")
  if [ -e "$AT/configs/$c" ] && ! recipe_is_ours "$c" "$rec"; then
    [ -n "$rec" ] \
      && die "$AT/configs/$c was changed after install; move your version away and run again. Nothing was changed."
    die "$AT/configs/$c has the name of this project's recipe configs/$c but not its content, and no manifest lists it; move it away and run again. Nothing was changed."
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

[ "$deps" = 1 ] && install_deps 9>&-  # pip does not hold the lock

# the manifest comes first
manifest_changed=0
[ "$(printf '%s\n' "${entries[@]}")" = "$(cat "$MANIFEST" 2>/dev/null)" ] || manifest_changed=1
[ "$manifest_changed" = 1 ] && plan "$([ -f "$MANIFEST" ] && echo replace || echo create)" "$MANIFEST_NAME"
for p in "${PATCHES[@]}"; do
  f="$(basename "$p" .patch)"
  [ "$(file_state "$f")" = pristine ] && plan replace "$f"
done
[ -L "$AT/plugins" ] || plan create plugins
for c in $(our_configs); do
  cmp -s "$REPO/configs/$c" "$AT/configs/$c" 2>/dev/null || plan "$([ -e "$AT/configs/$c" ] && echo replace || echo create)" "configs/$c"
done
if [ ${#journal[@]} = 0 ]; then
  echo "install.sh: already installed in $AT; nothing to do"; finish 0
fi

new_stage
for line in "${journal[@]}"; do
  IFS=$'\t' read -r kind target <<< "$line"
  name="${target//\//%}"
  case "$target" in
    "$MANIFEST_NAME")
      out=$(printf '%s\n' "${entries[@]}" 2>&1 > "$STAGE/$name.new") || fail "cannot write in $AT ($(reason "$out"))"
      [ "$kind" = replace ] && stage_backup "$MANIFEST" "$name.old" ;;
    plugins) out=$(ln -s "$REPO/plugins" "$STAGE/$name.new" 2>&1) || fail "cannot create a link in $AT ($(reason "$out"))" ;;
    configs/*)
      need_dir "$AT/configs"
      stage_copy "$REPO/$target" "$name.new"
      [ "$kind" = replace ] && stage_backup "$AT/$target" "$name.old" ;;
    *) stage_patched "$target" "$REPO/patches/$target.patch" ;;
  esac
done
commit
if [ ${#journal[@]} = 1 ] && [ "$manifest_changed" = 1 ]; then
  echo "install.sh: already installed in $AT; manifest updated"
else
  echo "install.sh: installed into $AT"
fi
finish 0
