#!/usr/bin/env bash
# Build the images' base locally, for machines that reach Debian's package archive but no container registry:
# a Debian bookworm root filesystem from debootstrap (minbase), brought up to date with bookworm-updates and
# bookworm-security, imported with `docker import`. It plays the part of python:3.11-slim-bookworm (the Dockerfile
# works on both): Debian's python3 is 3.11, so the project's cp311 manylinux wheels fit.
#
#   sudo scripts/base_image.sh                          # builds kfp-mlops/base:bookworm unless it exists
#   sudo scripts/base_image.sh --force                  # rebuilds it
#   BASE_TAG=registry.example.com/base:bookworm scripts/base_image.sh
#
# Needs root (debootstrap and chroot), debootstrap, and a Docker engine.
set -euo pipefail

BASE_TAG=${BASE_TAG:-kfp-mlops/base:bookworm}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
# What the images run on: Python 3.11 with venv (the images install into /opt/venv), CA certificates for boto3
# and requests, tini as PID 1 of the serving pods, passwd for the non-root user, netbase (/etc/services,
# /etc/protocols) and tzdata, as in python:3.11-slim. libstdc++6 and libgcc-s1 (torch's and numpy's wheels
# need them) come with apt, which minbase always holds.
PACKAGES=${PACKAGES:-python3,python3-venv,ca-certificates,tini,passwd,netbase,tzdata}
WORK=${WORK:-build/base-rootfs}

force=false
for arg in "$@"; do
    case "$arg" in
        --force) force=true ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "base_image.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
    esac
done

fail() { echo "base_image.sh: $*" >&2; exit 1; }

command -v docker >/dev/null || fail "docker not found: install a Docker engine (Debian: apt-get install docker.io)"
docker info >/dev/null 2>&1 || fail "the Docker engine does not answer: start dockerd, or add yourself to the docker group"
if ! $force && docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
    echo "base image $BASE_TAG exists; --force rebuilds it"
    exit 0
fi
[ "$(id -u)" -eq 0 ] || fail "debootstrap and chroot need root: run 'sudo make base-image' (or pass BASE=python:3.11-slim-bookworm where a registry is reachable)"
command -v debootstrap >/dev/null || fail "debootstrap not found: apt-get install debootstrap"

root=$(realpath -m "$WORK")
cleanup() {
    # /proc is mounted inside the tree while apt runs; never delete through a mount.
    if mountpoint -q "$root/proc" 2>/dev/null; then umount "$root/proc"; fi
    rm -rf --one-file-system "$root"
}
trap cleanup EXIT
cleanup
mkdir -p "$(dirname "$root")"

echo "debootstrap --variant=minbase $SUITE from $MIRROR into $root"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR"

# As Debian's slim images do: no documentation, manuals or translations, now and for every later apt-get install
# (the Java runtime of the serving stage).
cat > "$root/etc/dpkg/dpkg.cfg.d/01-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
EOF
cat > "$root/etc/apt/apt.conf.d/01-no-recommends" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
EOF

# debootstrap only knows the release itself; add its updates and security fixes.
cat > "$root/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOF
mount -t proc proc "$root/proc"
chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    sh -c 'apt-get update -q && apt-get upgrade -y -q && apt-get clean'
umount "$root/proc"

# Nothing of this machine goes into the image: debootstrap copied its resolver and host name (Docker supplies
# both at run time), and apt's lists, caches and logs are the build's.
rm -f "$root/etc/resolv.conf" "$root/etc/hostname"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old "$root"/var/log/* "$root"/tmp/*
find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/*

python_version=$(chroot "$root" python3 -c 'import platform; print(platform.python_version())')
echo "importing $root as $BASE_TAG (Python $python_version)"
tar --numeric-owner --xattrs -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --change "LABEL org.opencontainers.image.description=\"Debian $SUITE minbase with Python $python_version (scripts/base_image.sh)\"" \
    --message "debootstrap --variant=minbase --include=$PACKAGES $SUITE $MIRROR" \
    - "$BASE_TAG"
echo "built $BASE_TAG"
