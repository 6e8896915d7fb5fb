# Thin wrapper around scripts/setup-env.sh and .venv/. `make setup` is idempotent.
.PHONY: setup test demo walkthrough bench gates

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

# The main job: every algorithm ID on the embedded model through vLLM, one table
# (demo-output/results.md, results.json, chart.png; ~15 min). demo-output/ is the demo's own
# (git-ignored) folder, so a re-run replaces it. DEMO_ARGS: e.g. --quick, --algos W8A8 W4A4_DYNAMIC.
DEMO_ARGS ?=
demo: setup
	$(VENV)/bin/ascend-quant demo --out demo-output --overwrite $(DEMO_ARGS)

# The NumPy-reference walkthrough of one layer per algorithm (seconds; no vLLM).
walkthrough: setup
	$(VENV)/bin/ascend-quant walkthrough

bench: setup
	$(PYTEST) bench/ --run-bench $(PYTEST_ARGS)

# Performance gates: same-run speed-up ratios vs the floors in bench/benchlib.py (~2-3 min).
gates: setup
	$(PYTEST) bench/test_gates.py --run-bench -q $(PYTEST_ARGS)
