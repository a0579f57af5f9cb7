# meshmail developer tasks. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Lint rules live here, not in a config file: pyproject.toml holds only [build-system].
RUFF_ARGS := --line-length 120 --target-version py311 --select E,F,W,I,B,UP
# The product code also keeps functions small: cyclomatic complexity 12, 50 statements.
RUFF_LIMITS := --select C90,PLR0915 --config 'lint.mccabe.max-complexity=12' --config 'lint.pylint.max-statements=50'
PYTEST_ARGS ?=

.PHONY: test test-long lint demo bench-gossip bench-state bench-security bench-slave bench-proxy bench-mx bench-smoke clean

test: $(VENV)/.installed-test lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The full-size runs, left out of `make test` to keep CI short: the 100-node, 10,000-assignment
# convergence of tests/test_replication.py and the 20 rounds of kill -9 among 200 SMTP sessions
# of tests/test_mx_cluster.py (minutes each on two cores).
test-long: $(VENV)/.installed-test
	MESHMAIL_LONG=1 $(BIN)/python -m pytest -q tests/test_replication.py \
		tests/test_mx_cluster.py::test_kill_9_in_the_middle_of_many_sessions_loses_no_message_that_got_250 $(PYTEST_ARGS)

# A local cluster of two masters and two slaves (init, tokens, join), each slave with a real
# Dovecot when it is installed; Ctrl-C stops it. DEMO_DIR=folder keeps its files there (new
# or empty), DEMO_ARGS=--static runs it without Dovecot.
DEMO_DIR ?=
DEMO_ARGS ?=
demo: $(VENV)/.installed-test
	$(BIN)/python deploy/demo.py $(if $(DEMO_DIR),--dir $(DEMO_DIR)) $(DEMO_ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/python -m ruff check $(RUFF_ARGS) meshmail tests
	$(BIN)/python -m ruff check --target-version py311 $(RUFF_LIMITS) meshmail

# Benchmarks (tests/bench/): each exits 1 when it fails or misses a target. bench-gossip runs
# beside HashiCorp Serf (apt-get install serf) and needs root for its traffic figure.
bench-gossip: $(VENV)/.installed-test
	$(BIN)/python tests/bench/bench_gossip.py

bench-state: $(VENV)/.installed-test
	$(BIN)/python tests/bench/bench_state.py

bench-security: $(VENV)/.installed-test
	$(BIN)/python tests/bench/bench_security.py

bench-slave: $(VENV)/.installed-test
	$(BIN)/python tests/bench/bench_slave.py

# Beside nginx's mail proxy (apt-get install nginx-light libnginx-mod-mail), in front of a
# kit Dovecot: needs root.
bench-proxy: $(VENV)/.installed-test
	$(BIN)/python tests/bench/bench_proxy.py

# Beside Postfix (smtp-source and a kit Postfix), each in front of a kit Dovecot: needs root
# and the Debian packages postfix and dovecot-lmtpd.
bench-mx: $(VENV)/.installed-test
	$(BIN)/python tests/bench/bench_mx.py

# Every benchmark in short mode (small sizes, one round): fails on errors, not on figures.
# `make test` runs the same through tests/test_benches.py.
bench-smoke: $(VENV)/.installed-test
	$(BIN)/python tests/bench/bench_gossip.py --short
	$(BIN)/python tests/bench/bench_state.py --short
	$(BIN)/python tests/bench/bench_security.py --short
	$(BIN)/python tests/bench/bench_slave.py --short
	$(BIN)/python tests/bench/bench_proxy.py --short
	$(BIN)/python tests/bench/bench_mx.py --short

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamps: reinstall only when the package metadata changes (or the venv is new).
$(VENV)/.installed-%: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install -q -e '.[$*]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
