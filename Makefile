# The two commands of the README. Both set everything up first (tools/setup.sh is quick the second time).
.PHONY: setup run test bench lint

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

lint:
	@tools/setup.sh test
	tools/lint.sh
