#!/usr/bin/env bash
# The linter, as CI runs it (before the tests): ruff, configured in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/ruff check imguard tests bench tools
