#!/bin/sh
# What the tests need beyond the Python packages, installed once: the real
# OIDC provider's npm modules.  Idempotent: a second run installs nothing.
set -e
cd "$(dirname "$0")/.."

need_cmd() {
  command -v "$1" >/dev/null 2>&1 || { echo "tests need the '$1' command; install it and re-run" >&2; exit 1; }
}
# Debian packages, installed without starting their services (a
# policy-rc.d that refuses, for the time of the install).
apt_install() {
  [ $# -gt 0 ] || return 0
  need_cmd apt-get
  policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy"
  fi
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y "$@" || { [ -z "$policy" ] || rm -f "$policy"; exit 1; }
  [ -z "$policy" ] || rm -f "$policy"
}

need_cmd node
need_cmd npm
need_cmd pidof

# The OIDC provider (tests/idp), reinstalled when its lockfile changes.
stamp=tests/idp/node_modules/.clawdbot-lock
if [ ! -f "$stamp" ] || ! cmp -s tests/idp/package-lock.json "$stamp"; then
  (cd tests/idp && npm ci --no-audit --no-fund --loglevel=error)
  cp tests/idp/package-lock.json "$stamp"
fi

# The Node client libraries of the compatibility tests (tests/clients), the same way.
stamp=tests/clients/node_modules/.clawdbot-lock
if [ ! -f "$stamp" ] || ! cmp -s tests/clients/package-lock.json "$stamp"; then
  (cd tests/clients && npm ci --no-audit --no-fund --loglevel=error)
  cp tests/clients/package-lock.json "$stamp"
fi

# The Python clients that need openai 2.x (tests/clients/requirements.txt says
# why) in a virtualenv of their own, remade when that list changes.
stamp=tests/clients/.venv/.clawdbot-requirements
if [ ! -f "$stamp" ] || ! cmp -s tests/clients/requirements.txt "$stamp"; then
  rm -rf tests/clients/.venv
  "${PYTHON:-python3}" -m venv tests/clients/.venv
  tests/clients/.venv/bin/python -m pip install -q -r tests/clients/requirements.txt
  cp tests/clients/requirements.txt "$stamp"
fi

# Headless Chromium for the page tests (tests/browser.py drives Debian's
# /usr/bin/chromium with Playwright; no browser is ever downloaded), and a CJK
# font so the Chinese UI renders in screenshots.
pkgs=""
[ -x /usr/bin/chromium ] || pkgs="$pkgs chromium"
dpkg -s fonts-wqy-microhei >/dev/null 2>&1 || pkgs="$pkgs fonts-wqy-microhei"
apt_install $pkgs

# For tests/test_ops.py: nginx (`nginx -t` on etc/nginx/clawdbot.conf, and a
# real nginx that the test starts itself on loopback ports), systemd-analyze
# (`verify clawdbot.service`) and curl (the HTTP/2 client).  Nothing here
# starts nginx: while the package installs, a policy-rc.d (the one the
# machine has, or a temporary one) tells its postinst not to start the service.
pkgs=""
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || pkgs="$pkgs nginx"
command -v systemd-analyze >/dev/null 2>&1 || pkgs="$pkgs systemd"
command -v curl >/dev/null 2>&1 || pkgs="$pkgs curl"    # the HTTP/2 client
apt_install $pkgs

# For tests/test_outages.py: a private PostgreSQL (initdb and postgres from
# /usr/lib/postgresql/*/bin, run as the postgres user through setpriv), a
# private redis-server, chattr (a file even root cannot write) and mount (a
# small tmpfs that fills up).  Nothing here starts a service (policy-rc.d as above).
pkgs=""
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || pkgs="$pkgs postgresql"
command -v redis-server >/dev/null 2>&1 || pkgs="$pkgs redis-server"
command -v setpriv >/dev/null 2>&1 || pkgs="$pkgs util-linux"
command -v chattr >/dev/null 2>&1 || pkgs="$pkgs e2fsprogs"
command -v mount >/dev/null 2>&1 || pkgs="$pkgs mount"
apt_install $pkgs
