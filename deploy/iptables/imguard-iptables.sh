#!/bin/sh
# imguard: the iptables variant of deploy/nftables/imguard.nft (same rules, same parameters).
#
#   LAN_IF=eth1 CHAT_PORTS=5222,5223,6667,6697 IMGUARD_PORTS=8080 EXCLUDE="192.0.2.0/24" \
#       /usr/local/sbin/imguard-iptables.sh up        # or: down
#
#   LAN_IF        the interface the users' traffic arrives on (the gateway is their default route)
#   CHAT_PORTS    destination ports handed to imguard, comma-separated (must match imguard's --ports map)
#   IMGUARD_PORTS imguard's transparent listener port(s), comma-separated; with several (one worker per core),
#                 new connections are spread round-robin over them (statistic --mode nth)
#   EXCLUDE       space-separated destinations (addresses or networks) never redirected: banks, pinned apps
#   IPTABLES      the iptables binary (default: iptables; iptables-legacy works too)
#
# tests/test_inline_netns.py runs this very script. `up` is idempotent (it runs `down` first).
set -eu
LAN_IF=${LAN_IF:-eth1}
CHAT_PORTS=${CHAT_PORTS:-5222,5223,6667,6697}
IMGUARD_PORTS=${IMGUARD_PORTS:-8080}
EXCLUDE=${EXCLUDE:-192.0.2.0/24}
IPT=${IPTABLES:-iptables}

down() {
    $IPT -t nat -D PREROUTING -i "$LAN_IF" -p tcp -m multiport --dports "$CHAT_PORTS" -j IMGUARD 2>/dev/null || true
    $IPT -t nat -F IMGUARD 2>/dev/null || true
    $IPT -t nat -X IMGUARD 2>/dev/null || true
    $IPT -t filter -D INPUT -p tcp -m multiport --dports "$IMGUARD_PORTS" -j IMGUARD-IN 2>/dev/null || true
    $IPT -t filter -F IMGUARD-IN 2>/dev/null || true
    $IPT -t filter -X IMGUARD-IN 2>/dev/null || true
}

up() {
    down
    $IPT -t nat -N IMGUARD
    for net in $EXCLUDE; do
        $IPT -t nat -A IMGUARD -d "$net" -j RETURN
    done
    # Round-robin over the workers: rule i takes every (n-i)th of the connections still unmatched.
    ports=$(echo "$IMGUARD_PORTS" | tr ',' ' ')
    n=$(echo $ports | wc -w)
    i=0
    for port in $ports; do
        left=$((n - i))
        if [ "$left" -gt 1 ]; then
            $IPT -t nat -A IMGUARD -p tcp -m statistic --mode nth --every "$left" --packet 0 \
                -j REDIRECT --to-ports "$port"
        else
            $IPT -t nat -A IMGUARD -p tcp -j REDIRECT --to-ports "$port"
        fi
        i=$((i + 1))
    done
    $IPT -t nat -A PREROUTING -i "$LAN_IF" -p tcp -m multiport --dports "$CHAT_PORTS" -j IMGUARD
    # Only redirected connections may reach imguard's port (a direct one would make it connect to itself).
    $IPT -t filter -N IMGUARD-IN
    $IPT -t filter -A IMGUARD-IN -m conntrack --ctstate DNAT -j ACCEPT
    $IPT -t filter -A IMGUARD-IN -j DROP
    $IPT -t filter -I INPUT -p tcp -m multiport --dports "$IMGUARD_PORTS" -j IMGUARD-IN
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down  (parameters in the environment, see the head of this file)" >&2; exit 2 ;;
esac
