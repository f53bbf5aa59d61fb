#!/bin/sh
# imguard: the iptables variant of deploy/nftables/imguard.nft (same rules, same parameters).
#
#   LAN_IF=eth1 IMGUARD_PORTS=8080 EXCLUDE="192.0.2.0/24" /usr/local/sbin/imguard-iptables.sh up   # or: down
#
#   LAN_IF        the interface the users' traffic arrives on (the gateway is their default route)
#   EXCLUDE       space-separated destinations (addresses or networks) never redirected: banks, pinned apps.
#                 The one place to add an exclusion
#   IMGUARD_PORTS imguard's transparent listener port(s), comma-separated; with several (one worker per core),
#                 new connections are spread round-robin over them (statistic --mode nth)
#   CHAT_PORTS    imguard's default --ports map, comma-separated (the list of deploy/nftables/imguard.nft)
#   HTTP_PORTS    imguard's default --http-ports: HTTP(S) uploads and chat APIs (443 = ALL the users' HTTPS)
#   RELAY_PORTS   imguard's side-channel relays (bytestream relay 1080, DCC relay range), let in
#   SIP_UDP_SERVER the SIP server whose SIP over UDP (5060) goes to imguard's `--mode
#                 reverse:udp://SIP_UDP_SERVER:5060@5060` listener (UDP has no transparent mode; see the nft file).
#                 The default, a documentation address, redirects nothing. Other UDP is routed untouched
#   IPTABLES      the iptables binary (default: iptables; iptables-legacy works too)
#
# tests/test_inline_netns.py runs this very script, setting only LAN_IF, IMGUARD_PORTS and EXCLUDE, and checks
# the port lists below are imguard's defaults. `up` is idempotent (it runs `down` first).
set -eu
LAN_IF=${LAN_IF:-eth1}
EXCLUDE=${EXCLUDE:-192.0.2.0/24}
IMGUARD_PORTS=${IMGUARD_PORTS:-8080}
CHAT_PORTS=${CHAT_PORTS:-5222,5223,6667,6697,1863,5190,5050,5060,5061,2855,1533}
HTTP_PORTS=${HTTP_PORTS:-80,443,5280,5281,8080,8443}
RELAY_PORTS=${RELAY_PORTS:-1080,20000:20099}
SIP_UDP_SERVER=${SIP_UDP_SERVER:-192.0.2.1}
IPT=${IPTABLES:-iptables}

down() {
    for ports in "$CHAT_PORTS" "$HTTP_PORTS"; do
        $IPT -t nat -D PREROUTING -i "$LAN_IF" -p tcp -m multiport --dports "$ports" -j IMGUARD 2>/dev/null || true
    done
    $IPT -t nat -D PREROUTING -i "$LAN_IF" -d "$SIP_UDP_SERVER" -p udp --dport 5060 -j REDIRECT --to-ports 5060 \
        2>/dev/null || true
    $IPT -t nat -F IMGUARD 2>/dev/null || true
    $IPT -t nat -X IMGUARD 2>/dev/null || true
    $IPT -t filter -D INPUT -p tcp -m multiport --dports "$IMGUARD_PORTS" -j IMGUARD-IN 2>/dev/null || true
    $IPT -t filter -D INPUT -p tcp -m multiport --dports "$RELAY_PORTS" -j ACCEPT 2>/dev/null || true
    $IPT -t filter -F IMGUARD-IN 2>/dev/null || true
    $IPT -t filter -X IMGUARD-IN 2>/dev/null || true
}

up() {
    down
    $IPT -t nat -N IMGUARD
    for net in $EXCLUDE; do
        $IPT -t nat -A IMGUARD -d "$net" -j RETURN
    done
    # The gateway's own addresses (its relays, its SSH, ...) are never redirected.
    $IPT -t nat -A IMGUARD -m addrtype --dst-type LOCAL -j RETURN
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
    # multiport takes at most 15 ports per rule: one jump per list.
    for ports in "$CHAT_PORTS" "$HTTP_PORTS"; do
        $IPT -t nat -A PREROUTING -i "$LAN_IF" -p tcp -m multiport --dports "$ports" -j IMGUARD
    done
    $IPT -t nat -A PREROUTING -i "$LAN_IF" -d "$SIP_UDP_SERVER" -p udp --dport 5060 -j REDIRECT --to-ports 5060
    # Only redirected connections may reach imguard's port (a direct one would make it connect to itself).
    $IPT -t filter -N IMGUARD-IN
    $IPT -t filter -A IMGUARD-IN -m conntrack --ctstate DNAT -j ACCEPT
    $IPT -t filter -A IMGUARD-IN -j DROP
    $IPT -t filter -I INPUT -p tcp -m multiport --dports "$IMGUARD_PORTS" -j IMGUARD-IN
    # The relays are connected to directly (the rewritten offers name them).
    $IPT -t filter -I INPUT -p tcp -m multiport --dports "$RELAY_PORTS" -j ACCEPT
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down  (parameters in the environment, see the head of this file)" >&2; exit 2 ;;
esac
