# exam-footage: developer entry points (GNU make).
#   make demo    record 60 s from two synthetic cameras, upload, verify (installs what is missing)
#   make test    lint, then the whole test suite against real mosquitto, ffmpeg, SQLite and PostgreSQL
#   make lint    ruff and mypy (settings in pyproject.toml; tests, bench and demo: ruff only, looser rules)
#   make bench   throughput benchmarks (see docs/benchmarks.md)
#   make clean   remove demo-data/ (nothing else)

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
PACKAGES := exam_contract edge_agent collector retention
STAMP := $(VENV)/.installed-from-pyproject
PYTEST_ARGS ?=
# pytest-xdist workers: the long tests mostly wait on real-time video, so 4 fit on 2 cores (TEST_WORKERS=0: serial;
# tests/conftest.py orders the long ones so that they start at once on different workers)
TEST_WORKERS ?= 4
DEMO_SECONDS ?= 60
BENCH_MIB ?= 256
# GStreamer's RTSP server (run by Debian's python3) stands in for IP cameras in tests and bench/agent_cpu.py.
GST_PACKAGES := gir1.2-gst-rtsp-server-1.0 python3-gst-1.0 gstreamer1.0-plugins-ugly gstreamer1.0-plugins-good \
	gstreamer1.0-plugins-base

# The first python3 >= 3.11 on PATH (python3.13, 3.12, 3.11, then python3).
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& { command -v $$p; break; }; done)

.PHONY: help venv deps lint test demo bench bench-long clean

help:
	@echo "make demo   - record $(DEMO_SECONDS) s from two synthetic cameras, upload, verify (DEMO_SECONDS=N)"
	@echo "make test   - make lint, then run the test suite (PYTEST_ARGS='...' to pass options)"
	@echo "make lint   - ruff check and mypy"
	@echo "make bench  - MQTT baseline, ingest, scrub and export benchmarks, see docs/benchmarks.md"
	@echo "make bench-long - also coverage at a year's scale, backlog drain, agent CPU (an hour or more)"
	@echo "make venv   - create $(VENV) and pip install -e '.[test]'"
	@echo "make deps   - apt-get install what tests need when missing (ffmpeg, mosquitto, chromium, a CJK font, certutil, openssl, systemd, faketime, GStreamer RTSP)"
	@echo "make clean  - remove demo-data/"

venv: $(STAMP)

$(VENV)/bin/python:
	@test -n "$(PYTHON)" || { echo "make: error: no python3 >= 3.11 on PATH; install it (apt-get install python3 python3-venv)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV) || { echo "make: error: '$(PYTHON) -m venv' failed; on Debian install python3-venv" >&2; rm -rf $(VENV); exit 1; }

# Re-installs only when pyproject.toml changes (or the stamp is missing).
$(STAMP): pyproject.toml | $(VENV)/bin/python
	@$(VENV)/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
		echo "make: error: $(VENV) has Python < 3.11; remove it (rm -rf $(VENV)) and run make again" >&2; exit 1; }
	$(VENV)/bin/python -m pip install -e '.[test]'
	@touch $@

deps:
	@missing=""; \
	command -v ffmpeg >/dev/null 2>&1 || missing="$$missing ffmpeg"; \
	{ command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto; } || missing="$$missing mosquitto"; \
	test -x /usr/bin/chromium || missing="$$missing chromium"; \
	command -v certutil >/dev/null 2>&1 || missing="$$missing libnss3-tools"; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	command -v faketime >/dev/null 2>&1 || missing="$$missing faketime"; \
	fc-list :lang=zh family 2>/dev/null | grep -q . || missing="$$missing fonts-noto-cjk"; \
	for pkg in $(GST_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$pkg 2>/dev/null | grep -q "ok installed" || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi; \
		echo "installing$$missing with apt-get"; \
		$$sudo apt-get update && \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	fi

lint: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/ruff check $(PACKAGES) tests bench demo
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/mypy $(PACKAGES)

# lint first: a lint or type error fails the tests
test: deps venv lint
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --maxschedchunk 2 $(PYTEST_ARGS)

demo: deps venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/python -m demo --seconds $(DEMO_SECONDS)

# The quick ones (a few minutes); `make bench-long` adds those that run for 10+ minutes each.
bench: deps venv
	$(VENV)/bin/python -m bench.mqtt_baseline --mib $(BENCH_MIB)
	$(VENV)/bin/python -m bench.ingest --mib 1024
	$(VENV)/bin/python -m bench.scrub
	$(VENV)/bin/python -m bench.export --viewing

bench-long: bench
	rm -f build/bench-coverage.db && mkdir -p build
	$(VENV)/bin/python -m bench.coverage --database-url sqlite:///$(CURDIR)/build/bench-coverage.db
	$(VENV)/bin/python -m bench.backlog
	$(VENV)/bin/python -m bench.agent_cpu

clean:
	rm -rf demo-data
