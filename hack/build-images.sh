#!/usr/bin/env bash
# Builds the Tessera image (Dockerfile at the repository root: every binary
# and the interceptor), pushes it, and points manifests/kustomization.yaml at
# it so `kubectl apply -k manifests/` installs exactly that build.
#
#   REGISTRY=registry.example.com/gpu TAG=0.1.0 hack/build-images.sh
#
# Variables:
#   REGISTRY   where to push (default localhost:5000, e.g. a kind registry)
#   TAG        image tag (default: the workspace version from Cargo.toml)
#   IMAGE      image name under REGISTRY (default tessera)
#   PUSH       0 to build and patch without pushing (default 1)
#   PLATFORM   passed to `docker build --platform` when set (e.g. linux/amd64)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

REGISTRY="${REGISTRY:-localhost:5000}"
IMAGE="${IMAGE:-tessera}"
TAG="${TAG:-$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)}"
PUSH="${PUSH:-1}"
if [[ -z "$TAG" ]]; then
  echo "build-images: could not read the version from Cargo.toml; set TAG" >&2
  exit 1
fi
ref="${REGISTRY%/}/${IMAGE}:${TAG}"

platform_args=()
if [[ -n "${PLATFORM:-}" ]]; then
  platform_args=(--platform "$PLATFORM")
fi

echo "building $ref"
docker build "${platform_args[@]}" -t "$ref" -f Dockerfile .

if [[ "$PUSH" != "0" ]]; then
  echo "pushing $ref"
  docker push "$ref"
fi

# The manifests name the image `tessera`; kustomize's images entry maps it.
kustomization="manifests/kustomization.yaml"
if command -v kustomize >/dev/null 2>&1; then
  (cd manifests && kustomize edit set image "tessera=${REGISTRY%/}/${IMAGE}:${TAG}")
else
  # The images entry is `- name: tessera` followed by newName and newTag.
  sed -i.bak \
    -e "/^  - name: tessera\$/,/newTag:/ s|^\(    newName:\).*|\1 ${REGISTRY%/}/${IMAGE}|" \
    -e "/^  - name: tessera\$/,/newTag:/ s|^\(    newTag:\).*|\1 \"${TAG}\"|" \
    "$kustomization"
  rm -f "$kustomization.bak"
fi
grep -A2 '^  - name: tessera$' "$kustomization"
echo "done: kubectl apply -k manifests/ installs $ref"
