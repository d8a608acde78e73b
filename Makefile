# The two commands a new user needs (see README.md), plus the checks CI runs.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

.PHONY: demo test lint stack-up stack-down stack-status

## demo: start the local stack and run the demo pipeline.
demo: stack-up
	@echo
	@echo "The local stack is up (PostgreSQL, Kafka, OpenSearch on loopback):"
	@dev/stack status
	@echo
	@echo "The producer and consumer are not built yet, so there is no pipeline"
	@echo "to run on it. Connect to the services with: eval \"\$$(dev/stack env)\""
	@echo "Stop them with: dev/stack down"

## test: start the local stack if needed, then run every test against it.
test: stack-up
	eval "$$(dev/stack env)" && cargo test --workspace --locked

## lint: formatting and clippy, as CI checks them.
lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

stack-up:
	dev/stack up

stack-down:
	dev/stack down

stack-status:
	dev/stack status
