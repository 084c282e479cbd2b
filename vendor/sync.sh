#!/usr/bin/env bash
# Build the patched mlx-lm-lora tree (path 1) from the pinned PyPI sdist.
#
#   vendor/sync.sh [--pin FILE] [--cache DIR] [--dest DIR] [--patches DIR]
#
# 1. reads name/version/sha256 from the pin (default vendor/mlx-lm-lora.pin);
# 2. reuses <cache>/<sdist>.tar.gz (default cache: vendor/, git-ignored) or downloads it from
#    PyPI with `pip download`; checks its sha256 against the pin;
# 3. unpacks it into <dest>/<name>-<version>/ (default dest: vendor/src/, git-ignored), replacing
#    any earlier tree, makes it a git repository whose first commit (tag "upstream") is the
#    sdist as published, and applies <patches>/*.patch in order (default: patches/) with
#    `git am`, one commit each (with patch(1) and no repository where git is missing).
# Re-running is safe: the tree is always rebuilt from the sdist. The tree is assembled in a
# temporary folder and only moved into place once every patch applied.
# Change the series by committing in that repository; vendor/make-patches.sh writes it back.
# Use the result with:  PYTHONPATH=vendor/src/<name>-<version> mlx_lm_lora.train ...
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
pin="$here/mlx-lm-lora.pin"
cache="$here"
dest="$here/src"
patches="$root/patches"
python="${PYTHON:-python3}"

die() { echo "vendor/sync.sh: error: $*" >&2; exit 1; }
say() { echo "vendor/sync.sh: $*"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --pin) pin="$2"; shift 2 ;;
    --cache) cache="$2"; shift 2 ;;
    --dest) dest="$2"; shift 2 ;;
    --patches) patches="$2"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

[ -f "$pin" ] || die "pin file not found: $pin"
pinval() { sed -n "s/^$1=//p" "$pin" | tr -d '[:space:]'; }
name="$(pinval name)"; version="$(pinval version)"; want="$(pinval sha256)"
[ -n "$name" ] && [ -n "$version" ] || die "$pin must set name= and version="
printf '%s' "$want" | grep -Eq '^[0-9a-f]{64}$' || die "$pin must set sha256= to 64 hex digits"

dist="$(printf '%s' "$name" | tr '-' '_')-$version"   # sdist basename, e.g. mlx_lm_lora-5.10.2
sdist="$cache/$dist.tar.gz"
sha256() { "$python" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"; }

mkdir -p "$cache" "$dest"
tmp="$(mktemp -d "$dest/.sync.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

if [ -f "$sdist" ]; then
  say "using cached $sdist"
else
  say "downloading $name==$version (sdist) from PyPI"
  "$python" -m pip download --quiet --no-deps --no-binary :all: "$name==$version" -d "$tmp/dl" \
    || die "pip download of $name==$version failed (network? index?)"
  got="$(ls "$tmp/dl"/*.tar.gz 2>/dev/null | head -n1)"
  [ -n "$got" ] || die "pip download produced no .tar.gz sdist for $name==$version"
  have="$(sha256 "$got")"
  [ "$have" = "$want" ] || die "sha256 mismatch for downloaded $(basename "$got"):
  expected $want (from $pin)
  got      $have
Not using it. If the pin is wrong, fix it; otherwise the index served a different file."
  mv "$got" "$sdist"
fi

have="$(sha256 "$sdist")"
[ "$have" = "$want" ] || die "sha256 mismatch for $sdist:
  expected $want (from $pin)
  got      $have
Delete the cached file to download it again, or fix the pin."

tar --no-same-owner -xzf "$sdist" -C "$tmp" || die "cannot unpack $sdist"
[ -d "$tmp/$dist" ] || die "$sdist does not contain the folder $dist/"

git_here() {  # git inside $tmp/$dist only, with a fixed committer (authors come from the patches)
  (cd "$tmp/$dist" && GIT_CEILING_DIRECTORIES="$tmp" GIT_COMMITTER_NAME="vendor/sync.sh" \
    GIT_COMMITTER_EMAIL="sync@vendor.invalid" git -c core.autocrlf=false -c commit.gpgsign=false "$@")
}
use_git=0
if command -v git >/dev/null 2>&1; then
  use_git=1
  git_here init -q
  git_here add -A
  git_here -c user.name=upstream -c user.email=upstream@sdist.invalid commit -q \
    -m "$name $version as published on PyPI (sdist)"
  git_here tag upstream
fi
apply_patch() {  # $1 = patch file, applied inside $tmp/$dist
  if [ "$use_git" = 1 ]; then
    git_here am -q --keep-cr "$1" || { git_here am --abort >/dev/null 2>&1; return 1; }
  else  # no git: patch(1), same result without the commits
    patch -p1 --forward --batch --no-backup-if-mismatch --quiet -d "$tmp/$dist" < "$1"
  fi
}
shopt -s nullglob
n=0
for p in "$patches"/*.patch; do
  apply_patch "$p" || die "patch $(basename "$p") does not apply to $dist (see the output above)"
  say "applied $(basename "$p")"; n=$((n + 1))
done
[ "$n" -gt 0 ] || say "warning: no patches in $patches"

rm -rf "${dest:?}/$dist"
mv "$tmp/$dist" "$dest/$dist"
say "ready: $dest/$dist ($n patch(es) applied)"
