#!/bin/sh
# Entrypoint of a streaming replica on the official postgres image (docker-compose.yml).
#
# First start (empty PGDATA): wait for the primary, clone it with pg_basebackup -R
# (which writes standby.signal and primary_conninfo, password included), then run
# postgres as a hot standby.  Later starts find the clone and just resume streaming.
# Runs as the postgres user (compose: `user: postgres`).
set -eu
: "${PGDATA:=/var/lib/postgresql/data}"
: "${PRIMARY_HOST:?the primary's host name}"
: "${POSTGRES_USER:?}" "${POSTGRES_PASSWORD:?}"
export PGPASSWORD="$POSTGRES_PASSWORD"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    until pg_isready -q -h "$PRIMARY_HOST" -U "$POSTGRES_USER"; do
        echo "replica: waiting for $PRIMARY_HOST" >&2
        sleep 1
    done
    # A clone that died half-way left files behind: start again from nothing.
    find "$PGDATA" -mindepth 1 -delete
    pg_basebackup -h "$PRIMARY_HOST" -U "$POSTGRES_USER" -D "$PGDATA" \
        -R -X stream -c fast --no-password
    chmod 700 "$PGDATA"
fi
exec postgres "$@"
