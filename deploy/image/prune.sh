#!/usr/bin/env bash
# `make image-prune`: free the disk that earlier `make image` / `make base-image` runs hold.
#
# Removes every malaria-classifier and malaria-flows image except the ones tagged `latest`, untagged
# (dangling) images such as replaced offline bases, and buildah working containers left by failed
# builds of these images. With buildah's vfs driver each image layer is a full copy of the file
# system, so a few old builds fill a disk.
#
# Environment:
#   KEEP_LATEST     1 (default) keeps the `:latest` images; 0 removes them too
#   IMAGE_BACKEND   docker or buildah; default: docker when a daemon answers, else buildah
set -euo pipefail

keep_latest="${KEEP_LATEST:-1}"
backend="${IMAGE_BACKEND:-}"
if [[ -z "$backend" ]]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then backend=docker; else backend=buildah; fi
fi
if [[ "$backend" == buildah ]] && ! command -v buildah >/dev/null; then
    echo "buildah is not installed: no images to prune"
    exit 0
fi

list_images() {
    if [[ "$backend" == docker ]]; then
        docker images --format '{{.Repository}}:{{.Tag}} {{.ID}}'
    else
        buildah images --format '{{.Name}}:{{.Tag}} {{.ID}}'
    fi
}

kept_ids=()
if [[ "$keep_latest" == 1 ]]; then
    mapfile -t kept_ids < <(list_images | awk '$1 ~ /malaria-(classifier|flows):latest$/ {print $2}')
fi
is_kept() {
    local id
    for id in ${kept_ids[@]+"${kept_ids[@]}"}; do [[ "$id" == "$1" ]] && return 0; done
    return 1
}

removed=0
if [[ "$backend" == buildah ]]; then
    # A failed build leaves its working container (a full root file system) behind.
    while read -r container image_name; do
        [[ "$image_name" =~ malaria-(classifier|flows|base) ]] || continue
        buildah rm "$container" >/dev/null && echo "removed build container $container ($image_name)"
    done < <(buildah containers --format '{{.ContainerID}} {{.ImageName}}')
fi
while read -r name id; do
    [[ "$name" =~ malaria-(classifier|flows): ]] || continue
    is_kept "$id" && continue
    if [[ "$backend" == docker ]]; then docker rmi "$name" >/dev/null; else buildah rmi "$name" >/dev/null; fi
    echo "removed $name"
    removed=$((removed + 1))
done < <(list_images | sort -u)
if [[ "$backend" == docker ]]; then docker image prune -f >/dev/null; else buildah rmi --prune >/dev/null || true; fi
echo "pruned $removed image tags and the dangling images ($backend)"
