# The README's two commands: `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: demo test setup build lint

setup:
	@bash scripts/setup-libtorch
	@bash scripts/setup-test-tools

build:
	@bash scripts/setup-libtorch
	$(CARGO) build --release -p ferroclip -p ferroclip-worker

demo: build
	@bash scripts/demo

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: setup
	@bash scripts/test
