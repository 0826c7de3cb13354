# bloblo: `make run` starts it (with an embedded demo stack when nothing is configured),
# `make test` installs everything the tests need and runs them.

PYTHON      ?= python3
VENV        := .venv
BIN         := $(VENV)/bin
LS_VENV     := .venv-localstack
# LocalStack runs on the host only on Python 3.13 (see docs/testing.md); found via PATH or pyenv.
PYTHON313   ?= $(shell for p in $$HOME/.pyenv/versions/3.13*/bin/python3.13 $$(command -v python3.13); do \
                 "$$p" -c 'import sys' 2>/dev/null && { echo "$$p"; break; }; done)
APT_PACKAGES := docker-registry skopeo docker.io systemd

.PHONY: install run test bench lint lock clean

install: $(BIN)/.installed localstack-host system-packages

# The runtime lock is what `pip install .` brings; the test lock adds the test and demo tools.
$(BIN)/.installed: requirements.lock requirements-test.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements.lock -r requirements-test.lock
	$(BIN)/pip install --quiet --no-deps -e .  # the bloblo command
	touch $@

.PHONY: system-packages localstack-host
system-packages:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

localstack-host: $(LS_VENV)/.installed
$(LS_VENV)/.installed: localstack/requirements-host.txt
	@if [ -z "$(PYTHON313)" ]; then \
	  echo "no Python 3.13 found: LocalStack cannot run on this host; tests fall back to moto's S3 server"; \
	else \
	  test -x $(LS_VENV)/bin/python || $(PYTHON313) -m venv $(LS_VENV); \
	  $(LS_VENV)/bin/pip install --quiet -r localstack/requirements-host.txt && touch $@; \
	fi

run: install
	@if [ -n "$$BLOBLO_UPSTREAM_URL" ] || grep -qs '^BLOBLO_UPSTREAM_URL=' .env; then \
	  exec $(BIN)/gunicorn -c gunicorn.conf.py wsgi:app; \
	else \
	  exec $(BIN)/python -m tests.stack.demo; \
	fi

test: install
	$(BIN)/pytest tests

bench: install
	$(BIN)/python -m bench

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Both locks from scratch, in a throw-away venv: the runtime one from `pip install .`, the test
# one from what `.[test]` adds to it.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet .
	( sed -n '1,2p' requirements.lock; .lock-venv/bin/pip freeze --exclude bloblo ) > .lock-runtime
	.lock-venv/bin/pip install --quiet '.[test]'
	( sed -n '1,2p' requirements-test.lock; .lock-venv/bin/pip freeze --exclude bloblo \
	  | grep -vxFf .lock-runtime ) > .lock-test
	mv .lock-runtime requirements.lock && mv .lock-test requirements-test.lock && rm -rf .lock-venv

clean:
	rm -rf $(VENV) $(LS_VENV) .run
