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
SYSDEPS := redis-server:redis-server nginx:nginx systemd-analyze:systemd openssl:openssl \
	chromium:chromium
sysdeps:
	@missing=""; for pair in $(SYSDEPS); do \
		cmd=$${pair%%:*}; pkg=$${pair##*:}; \
		command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			$$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
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
	$(BIN)/python bench/run.py

demo: venv
	$(BIN)/python -m relay.demo

clean:
	rm -rf $(VENV) state .pytest_cache .ruff_cache .mypy_cache
