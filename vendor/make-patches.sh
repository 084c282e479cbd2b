#!/usr/bin/env bash
# Write the patch series in patches/ from the commits of the vendored tree.
#
#   vendor/make-patches.sh [--pin FILE] [--src DIR] [--patches DIR]
#
# vendor/sync.sh makes vendor/src/<name>-<version>/ a git repository: the sdist as published
# (tag "upstream"), then one commit per patch. Commit changes there (amend, rebase, add
# commits), then run this script: it replaces <patches>/*.patch with
# `git format-patch upstream..HEAD` (numbered, no signature, zeroed commit ids, so the files
# change only when a commit does). The series then applies to the pristine sdist with
# `git am`, `git apply` and `patch -p1` alike (tests/test_patch.py checks all three).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
pin="$here/mlx-lm-lora.pin"
src=""
patches="$root/patches"

die() { echo "vendor/make-patches.sh: error: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --pin) pin="$2"; shift 2 ;;
    --src) src="$2"; shift 2 ;;
    --patches) patches="$2"; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

pinval() { sed -n "s/^$1=//p" "$pin" | tr -d '[:space:]'; }
name="$(pinval name)"; version="$(pinval version)"
[ -n "$src" ] || src="$here/src/$(printf '%s' "$name" | tr '-' '_')-$version"
[ -d "$src/.git" ] || die "$src is not a git repository: run vendor/sync.sh first"
g() { (cd "$src" && GIT_CEILING_DIRECTORIES="$(dirname "$src")" git "$@"); }
g rev-parse -q --verify upstream >/dev/null || die "$src has no tag 'upstream' (the pristine sdist)"
[ -z "$(g status --porcelain)" ] || die "$src has uncommitted changes: commit them first"
n="$(g rev-list --count upstream..HEAD)"
[ "$n" -gt 0 ] || die "no commits on top of 'upstream' in $src"

mkdir -p "$patches"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
g format-patch -q --zero-commit --no-signature --abbrev=7 -o "$out" upstream..HEAD
rm -f "$patches"/*.patch
mv "$out"/*.patch "$patches"/
echo "vendor/make-patches.sh: wrote $n patch(es) to $patches:"
ls "$patches"/*.patch | sed 's|.*/|  |'
