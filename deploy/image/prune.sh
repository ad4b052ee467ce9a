#!/usr/bin/env bash
# `make image-prune`: free the disk that earlier `make image` / `make base-image` runs hold.
#
# Removes every malaria-classifier and malaria-flows image except the ones tagged `latest`, untagged
# (dangling) images such as replaced offline bases, buildah working containers of malaria images
# (left by failed builds: do not prune while a build or `make image-smoke` runs), and OCI archives in
# dist/ other than the one dist/image.env names. With buildah's vfs driver each image layer is a full
# copy of the file system, so a few old builds fill a disk.
#
# Environment:
#   KEEP_LATEST     1 (default) keeps the `:latest` images and dist/image.env's archive; 0 removes them too
#   IMAGE_BACKEND   docker or buildah; default: docker when a daemon answers, else buildah
set -euo pipefail

keep_latest="${KEEP_LATEST:-1}"
backend="${IMAGE_BACKEND:-}"
if [[ -z "$backend" ]]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then backend=docker; else backend=buildah; fi
fi
ours='^(localhost/)?malaria-(classifier|flows):'

current_archive=""
if [[ "$keep_latest" == 1 && -f dist/image.env ]]; then
    current_archive="$(sed -n 's/^ARCHIVE=//p' dist/image.env)"
fi
for archive in dist/*.oci.tar; do
    [[ -e "$archive" && "$archive" != "$current_archive" ]] || continue
    rm -f "$archive" && echo "removed $archive"
done

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
    mapfile -t kept_ids < <(list_images | awk '$1 ~ /^(localhost\/)?malaria-(classifier|flows):latest$/ {print $2}')
fi
is_kept() {
    local id
    for id in ${kept_ids[@]+"${kept_ids[@]}"}; do [[ "$id" == "$1" ]] && return 0; done
    return 1
}

if [[ "$backend" == buildah ]]; then
    while read -r container image_name; do
        [[ "$image_name" =~ ^(localhost/)?malaria-(classifier|flows|base): ]] || continue
        buildah rm "$container" >/dev/null && echo "removed build container $container ($image_name)"
    done < <(buildah containers --format '{{.ContainerID}} {{.ImageName}}')
fi
removed=0
while read -r name id; do
    [[ "$name" =~ $ours ]] || continue
    is_kept "$id" && continue
    if [[ "$backend" == docker ]]; then remove=(docker rmi "$name"); else remove=(buildah rmi "$name"); fi
    if ! "${remove[@]}" >/dev/null; then
        echo "kept $name: in use" >&2
        continue
    fi
    echo "removed $name"
    removed=$((removed + 1))
done < <(list_images | sort -u)
if [[ "$backend" == docker ]]; then docker image prune -f >/dev/null; else buildah rmi --prune >/dev/null || true; fi
echo "pruned $removed image tags and the dangling images ($backend)"
