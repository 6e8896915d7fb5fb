# Thin wrapper around scripts/setup-env.sh and .venv/. `make setup` is idempotent.
.PHONY: setup test demo bench

VENV := .venv
PY := $(VENV)/bin/python
# -P: do not put the current directory on sys.path, so tests import the
# installed ascend_quant.* packages and never bare folders such as reference/.
PYTEST := $(PY) -P -m pytest
HYPOTHESIS_PROFILE ?= $(if $(CI),ci,)
PYTEST_ARGS ?=

setup:
	@bash scripts/setup-env.sh

# ASCEND_QUANT_PYTEST_RC (set by .ci/run) receives pytest's own exit status.
test: setup
	@rc=0; $(PYTEST) -q $(if $(HYPOTHESIS_PROFILE),--hypothesis-profile=$(HYPOTHESIS_PROFILE)) $(PYTEST_ARGS) || rc=$$?; \
	if [ -n "$${ASCEND_QUANT_PYTEST_RC:-}" ]; then echo $$rc > "$$ASCEND_QUANT_PYTEST_RC"; fi; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests (exit 5)" >&2; fi; \
	exit $$rc

demo: setup
	$(VENV)/bin/ascend-quant walkthrough

bench: setup
	$(PYTEST) bench/ --run-bench $(PYTEST_ARGS)
