#!/usr/bin/env bash
# make deploy-check: the compose stack rehearsed on a real container engine, here.
#
# Debian's podman (runc, cgroupfs, CNI with dnsname for service names) configured by
# files under .run/deploy/ (CONTAINERS_CONF, CONTAINERS_STORAGE_CONF,
# CONTAINERS_REGISTRIES_CONF: the machine's own /etc is not touched), podman-compose
# from PyPI (pinned in .ci/constraints.txt), and, since no image registry is reachable,
# stand-ins for postgres:16, redis:7 and python:3.11-slim built from Debian's packages
# on a debootstrap base (deploy/standins/README.md says what of each official image's
# interface they honour).  Then docker-compose.yml itself runs: three workers, traffic
# through web, a worker SIGKILLed and restarted (deploy/check_stack.py checks), and
# everything is torn down (images stay in .run/deploy/storage as a cache; KEEP=1 leaves
# the stack running).
#
# Only loopback (the published ports, bound to 127.0.0.1) and the addresses of the
# container network this script creates are used.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
RUN="$ROOT/.run/deploy"
PROJECT="${PROJECT:-shopcheck}"
PY="$ROOT/.venv/bin/python"
STARTED=$(date +%s)
mkdir -p "$RUN"
cd "$ROOT"

say() { printf '[deploy-check %4ss] %s\n' "$(( $(date +%s) - STARTED ))" "$*"; }

# ---- tools ----------------------------------------------------------------------------
PACKAGES=(podman runc golang-github-containernetworking-plugin-dnsname
          containernetworking-plugins debootstrap iptables)
missing=()
for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
    say "installing ${missing[*]} (Debian)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
"$PY" -m pip install -q -c .ci/constraints.txt -e '.[deploy]'
COMPOSE=("$ROOT/.venv/bin/podman-compose" -p "$PROJECT" -f "$ROOT/docker-compose.yml")

# ---- engine configuration (ours, not /etc's) ----------------------------------------------
# Ulimits must be explicit and within this machine's hard limits (the defaults are
# refused by runc here); no systemd, so cgroupfs and a file event log.
cat > "$RUN/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=8192:8192"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
[network]
network_backend = "cni"
network_config_dir = "$RUN/cni"
EOF
cat > "$RUN/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$RUN/storage"
runroot = "$RUN/runroot"
EOF
# Short names (postgres:16) are looked up as docker.io/library/..., where the
# stand-ins are tagged; nothing is ever pulled.
cat > "$RUN/registries.conf" <<EOF
unqualified-search-registries = ["docker.io"]
short-name-mode = "permissive"
EOF
mkdir -p "$RUN/cni"
export CONTAINERS_CONF="$RUN/containers.conf" CONTAINERS_STORAGE_CONF="$RUN/storage.conf" \
    CONTAINERS_REGISTRIES_CONF="$RUN/registries.conf"

# ---- images -------------------------------------------------------------------------------
if ! podman image exists localhost/debian-minbase:bookworm; then
    say "debootstrap --variant=minbase bookworm"
    rm -rf "$RUN/rootfs"
    debootstrap --variant=minbase bookworm "$RUN/rootfs" >"$RUN/debootstrap.log" 2>&1
    tar -C "$RUN/rootfs" -c . | podman import -q - localhost/debian-minbase:bookworm >/dev/null
    rm -rf "$RUN/rootfs"
fi
say "stand-ins: postgres:16 redis:7 python:3.11-slim (Debian packages)"
podman build -q -t docker.io/library/postgres:16 deploy/standins/postgres >/dev/null
podman build -q -t docker.io/library/redis:7 deploy/standins/redis >/dev/null
context="$RUN/python-context"
rm -rf "$context" && mkdir -p "$context/ca"
cp deploy/standins/python/Containerfile "$context/"
cp /usr/local/share/ca-certificates/*.crt "$context/ca/" 2>/dev/null || true
if [[ -f /etc/pip.conf ]]; then cp /etc/pip.conf "$context/pip.conf"; else : > "$context/pip.conf"; fi
podman build -q -t docker.io/library/python:3.11-slim "$context" >/dev/null
say "the app image (Dockerfile)"
podman build -q -t localhost/shop-app:latest -f Dockerfile . >/dev/null

# ---- the stack --------------------------------------------------------------------------------
free_port() { "$PY" -c 'from shared.embedded import free_port; print(free_port())'; }
WEB=$(free_port)
FLOWER=$(free_port)
export ADMIN_TOKEN="check-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
export FLOWER_BASIC_AUTH="check:$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
export WEB_PORT="127.0.0.1:$WEB" FLOWER_PORT="127.0.0.1:$FLOWER" SHOP_IMAGE=localhost/shop-app:latest

teardown() {
    [[ -n "${HEALTH_PID:-}" ]] && kill "$HEALTH_PID" 2>/dev/null || true
    if [[ "${KEEP:-0}" == 1 ]]; then
        say "KEEP=1: the stack stays up (web on 127.0.0.1:$WEB, admin token $ADMIN_TOKEN);" \
            "the next make deploy-check removes it first"
        return
    fi
    say "tearing down"
    remove_stack
    say "done in $(( $(date +%s) - STARTED )) s"
}
remove_stack() {
    "${COMPOSE[@]}" down -v -t 5 >"$RUN/down.log" 2>&1 || true
    # What `down` leaves behind: the scaled containers past the first, the pod, the
    # volumes of those, the network.
    local label="label=io.podman.compose.project=$PROJECT" ids
    ids=$(podman ps -aq --filter "$label")
    [[ -z "$ids" ]] || podman rm -f -t 5 $ids >>"$RUN/down.log" 2>&1 || true
    podman pod rm -f "pod_$PROJECT" >>"$RUN/down.log" 2>&1 || true
    ids=$(podman volume ls -q --filter "$label")
    [[ -z "$ids" ]] || podman volume rm -f $ids >>"$RUN/down.log" 2>&1 || true
    podman network rm -f "${PROJECT}_default" >>"$RUN/down.log" 2>&1 || true
}
trap teardown EXIT
remove_stack  # leftovers of an interrupted run

# Podman runs healthchecks from systemd timers, and there is no systemd here: this loop
# is the timer (every 5 s, each container of the project).
(
    while sleep 5; do
        for c in $(podman ps -q --filter "label=io.podman.compose.project=$PROJECT"); do
            podman healthcheck run "$c" >/dev/null 2>&1 || true
        done
    done
) &
HEALTH_PID=$!

healthy() {  # healthy SERVICE... : every container of each is healthy (bounded wait)
    local deadline=$(( $(date +%s) + ${WAIT:-300} )) service status ids c
    for service in "$@"; do
        while :; do
            mapfile -t ids < <(podman ps -a -q --filter "label=io.podman.compose.project=$PROJECT" \
                --filter "label=io.podman.compose.service=$service")
            status=ok
            ((${#ids[@]})) || status=no
            for c in "${ids[@]}"; do
                podman healthcheck run "$c" >/dev/null 2>&1 || status=no
            done
            [[ $status == ok ]] && break
            if (( $(date +%s) > deadline )); then
                say "$service not healthy in time"
                "${COMPOSE[@]}" logs --tail 30 "$service" || true
                return 1
            fi
            sleep 2
        done
        say "$service: healthy (${#ids[@]} container(s))"
    done
}

# podman-compose ignores `condition: service_healthy` below podman 4.6 (Debian 12 has
# 4.3), and a later `up` of services whose dependencies run already trips over podman's
# own container dependencies: the order the compose file asks for is kept here instead,
# step by step, each step `--no-deps`.
up() { "${COMPOSE[@]}" up -d --no-recreate --no-deps "$@" >>"$RUN/up.log" 2>&1; }
: > "$RUN/up.log"
say "up: postgres, redis"
up postgres redis
healthy postgres redis
say "up: two streaming replicas (pg_basebackup -R)"
up postgres-replica postgres-replica-2
healthy postgres-replica postgres-replica-2
say "up: migrate (once)"
up migrate
migrate_exit=$(podman wait "${PROJECT}_migrate_1")
if [[ "$migrate_exit" != 0 ]]; then
    say "migrate exited $migrate_exit"
    "${COMPOSE[@]}" logs migrate || true
    exit 1
fi
say "up: web, 3 workers, history, beat, flower"
up --scale worker=3 web worker history beat flower
healthy web worker history beat flower

say "traffic and checks (deploy/check_stack.py)"
"$PY" deploy/check_stack.py --project "$PROJECT" --web "http://127.0.0.1:$WEB" \
    --flower "http://127.0.0.1:$FLOWER"
say "passed"
