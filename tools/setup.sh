#!/usr/bin/env bash
# Sets up everything imguard needs, on a fresh machine or a second time (then it takes about a second).
#   tools/setup.sh          the gateway's needs: libmagic, a Python >= 3.12, .venv with imguard installed
#   tools/setup.sh test     also the test peers (Prosody, ngIRCd) and the test dependencies
# Nothing here is done by hand elsewhere: a missing Debian package or pip package is installed by this script.
set -euo pipefail
cd "$(dirname "$0")/.."
want=${1:-run}

log() { printf 'setup: %s\n' "$*" >&2; }

# --- Debian packages -------------------------------------------------------------------------------
debs=(libmagic1 libarchive13)
debs+=(7zip unar)     # inspect/encrypted.py: encrypted 7z (7zz) and RAR (lsar/unar); tests/test_encrypted_7z_rar.py
[ "$want" = test ] && debs+=(prosody ngircd openssl iproute2 tshark tcpdump postgresql sipsak kamailio)
[ "$want" = test ] && debs+=(nftables iptables)     # tests/test_inline_netns.py: the deploy/ redirect rules
[ "$want" = test ] && debs+=(weechat-headless)     # tests/test_close_propagation.py: a real IRC client's view
# tests/test_evasion.py: the real extractors and readers that check the evasion corpus
[ "$want" = test ] && debs+=(unzip libarchive-tools xorriso genisoimage 7zip cpio lhasa pigz qpdf poppler-utils rpm)
[ "$want" = test ] && debs+=(sip-tester)           # tests/test_sip_live.py: SIPp, the registered SIP user agents
[ "$want" = test ] && debs+=(chromium chromium-driver)  # tests/test_console_e2e.py: the console in a real browser
[ "$want" = test ] && debs+=(rsyslog rsyslog-openssl)  # tests/test_sinks.py: a real rsyslogd (UDP, TCP, TLS)
[ "$want" = test ] && debs+=(finch tmux)           # tests/test_sametime.py: Finch's own Sametime client (libpurple)
[ "$want" = test ] && debs+=(dbus-daemon dbus-bin) # tests/test_sametime_files.py: Finch sends a file over libpurple's D-Bus API
# tests/test_real_irc_client.py (WeeChat's DCC, driven by its fifo plugin), tests/test_real_xmpp_clients.py
[ "$want" = test ] && debs+=(weechat-plugins profanity)
# tests/test_engines_clamav_icap.py: a real clamd and c-icap with virus_scan (the tests start their own instances)
[ "$want" = test ] && debs+=(clamav-daemon clamav c-icap libc-icap-mod-virus-scan)
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  log "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- a Python >= 3.12 ------------------------------------------------------------------------------
find_python() {
  local c
  for c in "${IMGUARD_PYTHON:-}" python3.13 python3.12 python3 \
           "$HOME"/.pyenv/versions/3.13*/bin/python3 "$HOME"/.pyenv/versions/3.12*/bin/python3 \
           /root/.pyenv/versions/3.13*/bin/python3 /root/.pyenv/versions/3.12*/bin/python3; do
    [ -n "$c" ] || continue
    command -v "$c" >/dev/null 2>&1 || [ -x "$c" ] || continue
    if "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  return 1
}

# --- test only: a real Synapse homeserver in its own venv (tests/peers/synapse.py), ~60-90 s the first time ----
if [ "$want" = test ] && [ ! -f .venv-synapse/.imguard-synapse ]; then
  py=$(find_python) || { log "no Python >= 3.12 found for .venv-synapse; set IMGUARD_PYTHON"; exit 2; }
  log "creating .venv-synapse with $py and installing matrix-synapse"
  rm -rf .venv-synapse
  "$py" -m venv .venv-synapse
  .venv-synapse/bin/python -m pip install -q --disable-pip-version-check matrix-synapse
  touch .venv-synapse/.imguard-synapse
fi

# --- the virtual environment, rebuilt only when setup.cfg changes ----------------------------------
stamp=".venv/.imguard-setup-$want"
key=$(cat setup.cfg pyproject.toml tools/setup.sh | sha256sum | cut -c1-16)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
  exit 0
fi
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
  py=$(find_python) || { log "no Python >= 3.12 found (tried python3.13, python3.12, pyenv); set IMGUARD_PYTHON"; exit 2; }
  log "creating .venv with $py ($("$py" --version))"
  rm -rf .venv
  "$py" -m venv .venv
fi
extra=""; [ "$want" = test ] && extra="[test]"
log "installing imguard$extra into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".$extra"
echo "$key" > "$stamp"
