#!/bin/sh
# The official redis image's entrypoint, as far as docker-compose.yml uses it.
set -eu
if [ "${1#-}" != "$1" ]; then set -- redis-server "$@"; fi
if [ "$1" = redis-server ] && [ "$(id -u)" = 0 ]; then
    find . \! -user redis -exec chown redis '{}' +
    exec gosu redis "$0" "$@"
fi
if [ "$1" = redis-server ]; then
    # The official build has protected mode off (the port is reached over the
    # container network); Debian's has it on. The caller's own arguments come after.
    shift
    set -- redis-server --protected-mode no "$@"
fi
exec "$@"
