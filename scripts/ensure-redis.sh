#!/usr/bin/env bash
# Make sure a Redis answers at 127.0.0.1:6379 (the tests talk to a real one): install and start it if not.
set -euo pipefail
ping_redis() {
    if command -v redis-cli >/dev/null 2>&1; then redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG
    else (exec 3<>/dev/tcp/127.0.0.1/6379 && printf 'PING\r\n' >&3 && timeout 2 head -c 5 <&3 | grep -q PONG) 2>/dev/null
    fi
}
if ping_redis; then echo "redis: answering"; exit 0; fi
if ! command -v redis-server >/dev/null 2>&1; then
    echo "redis: installing redis-server"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
mkdir -p /tmp/vls-redis
redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no --dir /tmp/vls-redis \
    --logfile /tmp/vls-redis/redis.log
for _ in $(seq 1 50); do ping_redis && { echo "redis: started"; exit 0; }; sleep 0.2; done
echo "redis: failed to start" >&2; exit 1
