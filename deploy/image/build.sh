#!/usr/bin/env bash
# `make image`: bentoml build -> bentoml containerize -> OCI archive under dist/.
#
# Environment:
#   BASE_IMAGE      base image instead of the bentofile's python:3.11-slim
#                   (e.g. localhost/malaria-base:bookworm from deploy/image/offline-base.sh)
#   CA_BUNDLE       CA bundle for the package index, mounted for the build only, never in the image
#   IMAGE_BACKEND   docker or buildah; default: docker when a daemon answers, else buildah
#   BENTOML         the bentoml executable (default .venv/bin/bentoml)
# Images: malaria-classifier:<bento version> (the Bento) and malaria-flows:<same version> (the Bento
# plus flows/ and the training requirements, for the compose `flows` service), both also `:latest`.
# Writes dist/malaria-classifier-<version>.oci.tar and dist/image.env (IMAGE=..., ARCHIVE=...).
set -euo pipefail

bentoml="${BENTOML:-.venv/bin/bentoml}"
python="$(dirname "$bentoml")/python"
backend="${IMAGE_BACKEND:-}"
if [[ -z "$backend" ]]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then backend=docker; else backend=buildah; fi
fi
if ! command -v "$backend" >/dev/null; then
    echo "make image needs a Docker engine or buildah: neither answers here (apt-get install buildah; see docs/deployment.md)" >&2
    exit 2
fi
started=$SECONDS

# vfs storage copies the whole file system per layer: one build of both images peaked at 10.7 GB
# (10 GiB) more disk in use (df sampled every 2 s during `make image` here).
if [[ "$backend" == buildah ]]; then
    graphroot="$(buildah info --format '{{.store.GraphRoot}}')"
    mkdir -p "$graphroot"
    free_gib=$(( $(df -Pk "$graphroot" | awk 'NR == 2 {print $4}') / 1024 / 1024 ))
    min_free_gib="${IMAGE_MIN_FREE_GIB:-14}"
    if (( free_gib < min_free_gib )); then
        echo "only ${free_gib} GiB free under $graphroot; building both images needs ${min_free_gib} GiB." >&2
        echo "Free space with \`make image-prune\` (old malaria images, dangling layers) and retry." >&2
        exit 2
    fi
fi

# A demo model trained on generated cells must never pass for a real one: packaging it needs the
# explicit override (branch builds of the GitHub workflow use it); the service then says so on every answer.
sources="$("$python" -c '
import bentoml
from malaria.config import get_settings
spec = bentoml.models.get(f"{get_settings().bento_model_name}:latest").info.metadata.get("spec", {})
print(",".join(spec.get("training_sources", [])) or "unrecorded")
')"
if [[ ",$sources," == *",synthetic,"* && "${MALARIA_IMAGE_ALLOW_SYNTHETIC:-false}" != true ]]; then
    echo "the model in the BentoML store was trained on synthetic data (a demo): train on real cells," >&2
    echo "or set MALARIA_IMAGE_ALLOW_SYNTHETIC=true to package a demo image (its answers carry X-Model-Warning)" >&2
    exit 2
fi

bentofile=bentofile.yaml
if [[ -n "${BASE_IMAGE:-}" ]]; then
    mkdir -p build
    bentofile=build/bentofile.image.yaml
    "$python" - "$BASE_IMAGE" "$bentofile" <<'EOF'
import sys

import yaml

recipe = yaml.safe_load(open("bentofile.yaml"))
docker = recipe.setdefault("docker", {})
docker["base_image"] = sys.argv[1]
for implied_by_base in ("distro", "python_version"):
    docker.pop(implied_by_base, None)
yaml.safe_dump(recipe, open(sys.argv[2], "w"), sort_keys=False)
EOF
fi

tag="$("$bentoml" build -f "$bentofile" -o tag . | sed -n 's/^__tag__://p')"
[[ -n "$tag" ]] || { echo "bentoml build printed no tag" >&2; exit 1; }
version="${tag#*:}"
image="malaria-classifier:${version}"
echo "bento $tag -> image $image (backend $backend, base ${BASE_IMAGE:-python:3.11-slim})"

# The CA bundle is bind-mounted into the RUN steps (buildah --volume) and named by build arguments.
ca_args=()
if [[ -n "${CA_BUNDLE:-}" ]]; then
    if [[ "$backend" != buildah ]]; then
        echo "CA_BUNDLE needs the buildah backend (docker build has no build-time volumes)" >&2
        exit 2
    fi
    ca_args=(--build-arg SSL_CERT_FILE=/run/build-ca.pem --build-arg PIP_CERT=/run/build-ca.pem)
fi
options=(${ca_args[@]+"${ca_args[@]}"})
if [[ -n "${CA_BUNDLE:-}" ]]; then
    options+=(--opt "volume=$(realpath "$CA_BUNDLE"):/run/build-ca.pem:ro")
    ca_args+=(--volume "$(realpath "$CA_BUNDLE"):/run/build-ca.pem:ro")
fi
# BentoML resolves the Dockerfile template inside its temporary build context and refuses paths
# outside the working directory, so that context must live under it.
mkdir -p build/tmp
TMPDIR="$PWD/build/tmp" "$bentoml" containerize "$tag" --backend "$backend" -t "$image" ${options[@]+"${options[@]}"}

# The flows image, from a context holding only what it adds.
flows_context=build/flows-image
rm -rf "$flows_context" && mkdir -p "$flows_context"
cp -r flows malaria requirements "$flows_context"/
find "$flows_context" -name __pycache__ -prune -exec rm -rf {} +
flows_image="malaria-flows:${version}"
if [[ "$backend" == docker ]]; then
    docker build -t "$flows_image" -f deploy/image/Containerfile.flows --build-arg "CLASSIFIER_IMAGE=$image" \
        "$flows_context"
    docker tag "$image" malaria-classifier:latest && docker tag "$flows_image" malaria-flows:latest
else
    buildah build --layers=false --force-rm -t "$flows_image" -f deploy/image/Containerfile.flows \
        --build-arg "CLASSIFIER_IMAGE=localhost/$image" ${ca_args[@]+"${ca_args[@]}"} "$flows_context"
    buildah tag "localhost/$image" malaria-classifier:latest
    buildah tag "localhost/$flows_image" malaria-flows:latest
fi

mkdir -p dist
archive="dist/malaria-classifier-${version}.oci.tar"
rm -f "$archive"
if [[ "$backend" == docker ]]; then
    docker save -o "$archive" "$image"
else
    buildah push "localhost/$image" "oci-archive:$archive:$image"
fi
printf 'IMAGE=%s\nFLOWS_IMAGE=%s\nARCHIVE=%s\nBACKEND=%s\n' "$image" "$flows_image" "$archive" "$backend" \
    > dist/image.env
echo "image $image: archive $archive ($(du -h "$archive" | cut -f1)), built in $((SECONDS - started)) s"
