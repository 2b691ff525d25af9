# relay — `make run` and `make test` set everything up from a clean clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck bench demo clean venv sysdeps

venv: $(STAMP)

# Test-only system tools from Debian's packages: redis-server (scale-out tests start their own),
# nginx (the reverse-proxy example is tested live), systemd-analyze (unit files are verified),
# chromium (browser use is tested in a real headless Chromium).
# Missing ones are installed with apt-get (through sudo when not root).
SYSDEPS := redis-server:redis-server nginx:nginx systemd-analyze:systemd openssl:openssl \
	chromium:chromium
# Debian starts and enables a service when its package is installed. The tests start their own
# redis-server and nginx on free ports, so a freshly installed system copy is switched off again
# (a system nginx would sit on port 80, a system redis on 6379). Services installed before are
# left alone.
SYSDEPS_SERVICES := redis-server nginx
SYSTEMD_RUNTIME ?= /run/systemd/system
sysdeps:
	@missing=""; for pair in $(SYSDEPS); do \
		cmd=$${pair%%:*}; pkg=$${pair##*:}; \
		command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing test tools with apt-get:$$missing"; \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			$$SUDO apt-get install -y -qq --no-install-recommends $$missing || exit 1; \
		for svc in $(SYSDEPS_SERVICES); do \
			case " $$missing " in *" $$svc "*) ;; *) continue ;; esac; \
			echo "stopping and disabling the system $$svc service (the tests run their own)"; \
			if [ -d $(SYSTEMD_RUNTIME) ]; then \
				$$SUDO systemctl disable --now $$svc >/dev/null 2>&1 || true; \
			else \
				$$SUDO service $$svc stop >/dev/null 2>&1 || true; \
				$$SUDO update-rc.d $$svc disable >/dev/null 2>&1 || true; \
			fi; \
		done; \
	fi

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: venv
	$(BIN)/relay serve --config config.toml

test: venv sysdeps
	$(BIN)/ruff check relay tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check relay tests bench

typecheck: venv
	$(BIN)/mypy

bench: venv
	$(BIN)/python bench/run.py --profile W1

demo: venv
	$(BIN)/python -m relay.demo

clean:
	rm -rf $(VENV) state .pytest_cache .ruff_cache .mypy_cache
