# nvr-guard — set-up, tests, demo.
#
#   make demo     system packages (if missing) + virtualenv + the demo daemon on generated footage,
#                 and an export walked through by demo users (as root)
#   make test     system packages (if missing) + virtualenv + the whole test suite
#   make test-fast  virtualenv + tests/unit only (pure cores, in-process; the edit loop)
#
# Every target is idempotent: apt-get runs only when a package is missing, pip only when
# pyproject.toml or constraints.txt changed since the last install.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

# The system interpreter when it is new enough (Debian 12: 3.11): the venv must be usable by
# other users too — the service user, and the tests that run the CLI as `nobody` — and an
# interpreter under /root (pyenv) is not. Else the first python3 on PATH.
PYTHON      ?= $(shell for p in /usr/bin/python3 python3; do \
                 $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 \
                 && { command -v $$p; exit; }; done; echo python3)
VENV        ?= .venv
STAMP       := $(VENV)/.nvr-guard-installed
PYTEST_ARGS ?=
DEMO_ARGS   ?=
BENCH_ARGS  ?=

# Debian packages the project uses at run or test time. systemd is checked by its
# tool, not its package: a container may have systemd-analyze from another package set.
APT_PACKAGES := ffmpeg clamav clamav-daemon fonts-wqy-zenhei fonts-dejavu-core fontconfig e2fsprogs util-linux procps dosfstools openssl passwd tzdata groff-base
# Only the tests need these: tests/fixtures/container.py builds a Debian tree and boots the unit
# under a real systemd in it. `make test` adds them to what `deps` installs (a target-specific
# variable reaches the prerequisites); `make install-service` does not put them on a recorder.
# chromium + chromium-driver: the web console's browser tests (Selenium drives Debian's build).
APT_TEST_PACKAGES := debootstrap systemd-container chromium chromium-driver p7zip-full

# Service installation (make install-service): a venv outside /root and /home, because the
# unit's ProtectHome=yes hides those from the daemon.
PREFIX          ?= /opt/nvr-guard
SYSTEM_PYTHON   ?= /usr/bin/python3
UNITDIR         ?= /etc/systemd/system
SYSUSERSDIR     ?= /usr/lib/sysusers.d
TMPFILESDIR     ?= /usr/lib/tmpfiles.d
CONFDIR         ?= /etc/nvr-guard
PAMDIR          ?= /etc/pam.d
BINDIR          ?= /usr/local/bin
# the man page and bash completion: /usr/local/share for a program installed beside the
# distribution's (bash-completion and man look there by default), /usr/share for PREFIX=/usr
DATADIR         ?= $(if $(filter /usr,$(PREFIX)),/usr/share,/usr/local/share)
MANDIR          ?= $(DATADIR)/man
BASHCOMPDIR     ?= $(DATADIR)/bash-completion/completions

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help deps venv test test-fast demo lint bench clean distclean install-service install-docs install-web

help:
	@echo "make demo             run the demo daemon on generated recordings, then walk an export"
	@echo "                      (request, approvals, scan, export, verify) as demo Unix users"
	@echo "make test             run the test suite (PYTEST_ARGS='-k control' to narrow it)"
	@echo "make test-fast        run tests/unit only: pure cores and in-process tests, no ffmpeg,"
	@echo "                      ClamAV, loop devices, Unix users or daemons (under a minute)"
	@echo "make lint             ruff + mypy --strict on nvr_guard/"
	@echo "make bench            retention benchmarks (bench/retention.py; BENCH_ARGS=...)"
	@echo "make install-service  install into $(PREFIX) and the systemd unit (root), with the"
	@echo "                      man page and bash completion (make install-docs)"
	@echo "make clean            remove caches, generated demo data and the demo users (nvrdemo-*);"
	@echo "                      distclean also .venv"

# ---------------------------------------------------------------------------------------------
# System packages: installed only when missing; `apt-get update` only then too.
deps:
	@missing=""; \
	for pkg in $(APT_PACKAGES); do \
	  status=$$(dpkg-query -W -f='$${Status}' "$$pkg" 2>/dev/null || true); \
	  [ "$$status" = "install ok installed" ] || missing="$$missing $$pkg"; \
	done; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	if ! command -v $(PYTHON) >/dev/null 2>&1; then \
	  missing="$$missing python3 python3-venv"; \
	elif ! $(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1; then \
	  missing="$$missing python3-venv"; \
	fi; \
	if [ -n "$$missing" ]; then \
	  echo "installing missing system packages:$$missing"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

# ---------------------------------------------------------------------------------------------
# Virtualenv: created once; the project (editable) and its pinned dependencies are reinstalled
# only when pyproject.toml or constraints.txt is newer than the stamp.
venv: $(STAMP)

$(VENV)/bin/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || { \
	  echo "nvr-guard needs Python >= 3.11; $(PYTHON) is $$($(PYTHON) -V 2>&1)." \
	       "Use PYTHON=/path/to/python3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -q -c constraints.txt -e '.[test,dev]'
	@touch $@

# ---------------------------------------------------------------------------------------------
# pytest's own exit code decides; 5 ("no tests collected") is a failure too, with a message,
# so a broken collection can never pass as green.
define run_pytest
@rc=0; $(VENV)/bin/pytest -q $(1) $(PYTEST_ARGS) || rc=$$?; \
if [ $$rc -eq 5 ]; then echo "make $@: pytest collected no tests; failing" >&2; fi; \
if [ $$rc -ne 0 ]; then echo "make $@: pytest exited with $$rc" >&2; exit $$rc; fi
endef

# Everything: tests/unit and tests/integration (testpaths in pyproject.toml).
test: APT_PACKAGES += $(APT_TEST_PACKAGES)
test: deps venv
	$(call run_pytest,)

# The edit loop: tests/unit only (pure cores and in-process tests; under a minute).
test-fast: venv
	$(call run_pytest,tests/unit)

demo: deps venv
	$(VENV)/bin/python -m nvr_guard.demo $(DEMO_ARGS)

lint: venv
	$(VENV)/bin/ruff check nvr_guard tests
	$(VENV)/bin/ruff format --check nvr_guard tests
	$(VENV)/bin/mypy nvr_guard

bench: deps venv
	$(VENV)/bin/python bench/retention.py $(BENCH_ARGS)

# clean also removes the demo's Unix users and groups (only accounts the demo made; root only,
# a no-op when there are none)
clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build demo nvr_guard.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
	[ ! -x $(VENV)/bin/python ] || $(VENV)/bin/python -m nvr_guard.demo --remove-users

distclean: clean
	rm -rf $(VENV)

# ---------------------------------------------------------------------------------------------
# Service installation: a venv in $(PREFIX) with the pinned dependencies, the unit, its
# sysusers/tmpfiles snippets and — when $(PREFIX) is not /usr — a drop-in pointing ExecStart
# at the venv. Does not enable or start anything: review the config first.
install-service: deps
	@case "$(PREFIX)" in /root*|/home*|/run/user*) \
	  echo "PREFIX=$(PREFIX) is hidden from the service by ProtectHome=yes; use /opt/..." >&2; \
	  exit 1;; esac
	[ -x $(PREFIX)/bin/python ] || $(SYSTEM_PYTHON) -m venv $(PREFIX)
	$(PREFIX)/bin/python -m pip install -q -c constraints.txt .
	@$(MAKE) install-docs
	install -d -m 0755 $(UNITDIR) $(SYSUSERSDIR) $(TMPFILESDIR)
	install -m 0644 systemd/nvr-guard.service $(UNITDIR)/nvr-guard.service
	install -m 0644 systemd/nvr-guard.sysusers $(SYSUSERSDIR)/nvr-guard.conf
	install -m 0644 systemd/nvr-guard.tmpfiles $(TMPFILESDIR)/nvr-guard.conf
	install -d -m 0755 $(UNITDIR)/nvr-guard.service.d
	@if [ "$(PREFIX)" != /usr ]; then \
	  printf '%s\n' '# Written by make install-service: the daemon lives in a venv.' \
	    '[Service]' 'ExecStart=' 'ExecStart=$(PREFIX)/bin/nvr-guard daemon' \
	    'ExecReload=' 'ExecReload=$(PREFIX)/bin/nvr-guard reload' \
	    > $(UNITDIR)/nvr-guard.service.d/10-venv.conf; \
	  echo "wrote $(UNITDIR)/nvr-guard.service.d/10-venv.conf"; \
	  install -d -m 0755 $(BINDIR); \
	  ln -sfn $(PREFIX)/bin/nvr-guard $(BINDIR)/nvr-guard; \
	  echo "linked $(BINDIR)/nvr-guard -> $(PREFIX)/bin/nvr-guard"; \
	fi
# the web console's password check: socket + per-login service, and its PAM service
# (installed only when missing: an admin's edits of /etc/pam.d/nvr-guard stay)
	install -m 0644 systemd/nvr-guard-auth.socket $(UNITDIR)/nvr-guard-auth.socket
	install -m 0644 systemd/nvr-guard-auth@.service $(UNITDIR)/nvr-guard-auth@.service
	@if [ "$(PREFIX)" != /usr ]; then \
	  install -d -m 0755 $(UNITDIR)/nvr-guard-auth@.service.d; \
	  printf '%s\n' '# Written by make install-service: nvr-guard lives in a venv.' \
	    '[Service]' 'ExecStart=' 'ExecStart=$(PREFIX)/bin/nvr-guard web-auth' \
	    > $(UNITDIR)/nvr-guard-auth@.service.d/10-venv.conf; \
	fi
	@if [ -e $(PAMDIR)/nvr-guard ]; then \
	  echo "kept $(PAMDIR)/nvr-guard (compare with config/pam.d/nvr-guard)"; \
	else \
	  install -d -m 0755 $(PAMDIR); \
	  install -m 0644 config/pam.d/nvr-guard $(PAMDIR)/nvr-guard; \
	  echo "installed $(PAMDIR)/nvr-guard"; \
	fi
	@if [ -e $(CONFDIR)/config.yaml ]; then \
	  $(PREFIX)/bin/nvr-guard --config $(CONFDIR)/config.yaml unit-paths \
	    > $(UNITDIR)/nvr-guard.service.d/.20-paths.conf.new; \
	  mv $(UNITDIR)/nvr-guard.service.d/.20-paths.conf.new $(UNITDIR)/nvr-guard.service.d/20-paths.conf; \
	  echo "wrote $(UNITDIR)/nvr-guard.service.d/20-paths.conf (ReadWritePaths= from $(CONFDIR)/config.yaml)"; \
	fi
	@if [ -d /run/systemd/system ] && [ "$(UNITDIR)" = /etc/systemd/system ]; then \
	  systemd-sysusers $(SYSUSERSDIR)/nvr-guard.conf; \
	  systemd-tmpfiles --create $(TMPFILESDIR)/nvr-guard.conf; \
	  systemctl daemon-reload; \
	fi
	@$(MAKE) install-web
	@if [ -d /run/systemd/system ] && [ "$(UNITDIR)" = /etc/systemd/system ]; then systemctl daemon-reload; fi
	@[ -e $(CONFDIR)/config.yaml ] || echo "next: write $(CONFDIR)/config.yaml (see config/)," \
	  "check it with 'nvr-guard config check', run 'make install-service' again (it writes" \
	  "the ReadWritePaths= drop-in for your roots and export targets), then" \
	  "'systemctl enable --now nvr-guard'"

# The web console's unit (and a drop-in for the venv), and a self-signed TLS pair in
# $(CONFDIR)/web/ when there is none: the key readable by the console's group only. Its
# fingerprint is printed for people to compare when their browser first warns about it.
WEBTLSDIR := $(CONFDIR)/web
install-web:
	install -m 0644 systemd/nvr-guard-web.service $(UNITDIR)/nvr-guard-web.service
	@if [ "$(PREFIX)" != /usr ]; then \
	  install -d -m 0755 $(UNITDIR)/nvr-guard-web.service.d; \
	  printf '%s\n' '# Written by make install-service: the console lives in a venv.' \
	    '[Service]' 'ExecStart=' 'ExecStart=$(PREFIX)/bin/nvr-guard web' \
	    > $(UNITDIR)/nvr-guard-web.service.d/10-venv.conf; \
	fi
	@if [ ! -e $(WEBTLSDIR)/tls.crt ] || [ ! -e $(WEBTLSDIR)/tls.key ]; then \
	  install -d -m 0755 $(WEBTLSDIR); \
	  umask 077; host=$$(hostname -f 2>/dev/null || hostname); \
	  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 825 \
	    -subj "/CN=$$host" -addext "subjectAltName=DNS:$$host,DNS:$$(hostname)" \
	    -keyout $(WEBTLSDIR)/tls.key -out $(WEBTLSDIR)/tls.crt 2>/dev/null; \
	  chmod 0644 $(WEBTLSDIR)/tls.crt; chmod 0640 $(WEBTLSDIR)/tls.key; \
	  if getent group nvr-guard-web >/dev/null; then chgrp nvr-guard-web $(WEBTLSDIR)/tls.key; \
	  else echo "group nvr-guard-web does not exist yet: chgrp nvr-guard-web $(WEBTLSDIR)/tls.key after systemd-sysusers"; fi; \
	  echo "made a self-signed TLS pair for the web console: $(WEBTLSDIR)/tls.crt"; \
	fi
	@echo "web console certificate $$(openssl x509 -noout -fingerprint -sha256 -in $(WEBTLSDIR)/tls.crt)"

# The man page and bash completion of the program installed in $(PREFIX), both generated from
# its click command tree (so they list exactly the commands it has); install-service runs it.
install-docs:
	install -d -m 0755 $(MANDIR)/man1 $(BASHCOMPDIR)
	$(PREFIX)/bin/python -m nvr_guard.cli.manpage > $(MANDIR)/man1/.nvr-guard.1.tmp
	mv -f $(MANDIR)/man1/.nvr-guard.1.tmp $(MANDIR)/man1/nvr-guard.1
	chmod 0644 $(MANDIR)/man1/nvr-guard.1
	_NVR_GUARD_COMPLETE=bash_source $(PREFIX)/bin/nvr-guard > $(BASHCOMPDIR)/.nvr-guard.tmp
	mv -f $(BASHCOMPDIR)/.nvr-guard.tmp $(BASHCOMPDIR)/nvr-guard
	chmod 0644 $(BASHCOMPDIR)/nvr-guard
	@echo "installed $(MANDIR)/man1/nvr-guard.1 (man nvr-guard) and $(BASHCOMPDIR)/nvr-guard"
