# bloblo: `make run` starts it (with an embedded demo stack when nothing is configured),
# `make test` installs everything the tests need and runs them; `make install` is the server's
# runtime alone (a production host).

PYTHON      ?= python3
VENV        := .venv
BIN         := $(VENV)/bin
LS_VENV     := .venv-localstack
# LocalStack runs on the host only on Python 3.13 (see docs/testing.md); found via PATH or pyenv.
PYTHON313   ?= $(shell for p in $$HOME/.pyenv/versions/3.13*/bin/python3.13 $$(command -v python3.13); do \
                 "$$p" -c 'import sys' 2>/dev/null && { echo "$$p"; break; }; done)
APT_PACKAGES := docker-registry skopeo docker.io systemd apache2-utils

.PHONY: install dev run test bench lint lock clean

# What the server needs, and all a production host gets: the venv with the runtime lock and the
# bloblo command (the systemd unit runs .venv/bin/gunicorn from the checkout).
install: $(BIN)/.installed

$(BIN)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .  # the bloblo command
	touch $@

# What the tests, the demo and the benchmarks add: the test lock, Debian's registry, skopeo and
# docker, LocalStack on the host.
dev: $(BIN)/.installed-dev localstack-host system-packages

$(BIN)/.installed-dev: $(BIN)/.installed requirements-test.lock
	$(BIN)/pip install --quiet -r requirements.lock -r requirements-test.lock
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

run: dev
	@if [ -n "$$BLOBLO_UPSTREAM_URL" ] || grep -qs '^BLOBLO_UPSTREAM_URL=' .env; then \
	  exec $(BIN)/gunicorn -c gunicorn.conf.py wsgi:app; \
	else \
	  exec $(BIN)/python -m tests.stack.demo; \
	fi

test: dev
	$(BIN)/pytest tests

bench: dev
	$(BIN)/python -m bench

lint: $(BIN)/.installed-dev
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
