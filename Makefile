# The two commands of the README. Both set everything up first (tools/setup.sh is quick the second time).
.PHONY: setup run test bench bench-targets lint settings fuzz

setup:
	@tools/setup.sh

run: setup
	.venv/bin/imguard run $(ARGS)

test:
	@tools/setup.sh test
	tools/lint.sh
	.venv/bin/python -m pytest $(PYTEST_ARGS)

bench: setup
	.venv/bin/python bench/bench_inspect.py

# Every row of the performance table (issue 21) in one run, each against its target: RUNS=3 for three passes.
RUNS ?= 1
bench-targets: setup
	.venv/bin/python bench/bench_targets.py --runs $(RUNS)

lint:
	@tools/setup.sh test
	tools/lint.sh

# docs/settings.md and deploy/imguard.yaml are generated from the settings' declarations: run after changing one
# (tests/test_config.py fails until then).
settings: setup
	.venv/bin/imguard config docs > docs/settings.md
	.venv/bin/imguard config example > deploy/imguard.yaml

# Coverage-guided fuzzing of every decoder and session (tests/fuzz/): FUZZ_SECONDS per harness (a release check runs
# the default, 10 minutes each), the corpus kept in .fuzz/<harness>/ between runs, crashes written to .fuzz/crashes/.
# The suite runs a short bounded pass (tests/test_fuzz.py).
FUZZ_SECONDS ?= 600
FUZZ_HARNESSES ?= xmpp irc msnp oscar ymsg sip msrp socks5 httpchat
fuzz:
	@tools/setup.sh test
	@mkdir -p .fuzz/crashes
	@for h in $(FUZZ_HARNESSES); do \
		mkdir -p .fuzz/$$h; \
		.venv/bin/python -m tests.fuzz.seed $$h .fuzz/$$h || exit 1; \
		echo "fuzz $$h: $(FUZZ_SECONDS) s"; \
		.venv/bin/python -m tests.fuzz.run $$h .fuzz/$$h -max_total_time=$(FUZZ_SECONDS) \
			-artifact_prefix=.fuzz/crashes/$$h- -print_final_stats=1 || exit 1; \
	done
