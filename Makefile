# The two commands a new user needs (see README.md), plus the checks CI runs.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

.PHONY: demo demo-stop test lint soak cluster-test stack-up stack-down stack-status

## demo: start the local stack and run the demo pipeline (see dev/demo).
demo:
	dev/demo

## test: start the local stack if needed, then run every test against it:
## every test binary of the workspace and the doctests, built once, then
## run three at a time, longest first (dev/testkit/src/bin/tidemark-test.rs;
## TIDEMARK_TEST_JOBS=1 runs them one by one, as `cargo test` would;
## TEST_ARGS are passed to every test binary, e.g. a test name filter).
test: stack-up
	eval "$$(dev/stack env)" && cargo run -q --locked -p tidemark-testkit --bin tidemark-test -- -- $(TEST_ARGS)

## soak: kill -9 the producer and consumer 50 times under load, restart
## each server once, then audit (minutes; not part of `test`). See dev/soak.
soak:
	dev/soak

## cluster-test: the failure tests at full length: the leader broker of a
## busy partition of a three-node Kafka cluster (which the test starts)
## killed with SIGKILL and restarted 5 times under load, a stall, rebalance
## storms (about 4 minutes; `make test` runs a short version), and an
## OpenSearch node of a three-node cluster killed and restarted.
cluster-test: stack-up
	eval "$$(dev/stack env)" && TIDEMARK_CLUSTER_KILLS=5 cargo test --locked -p tidemark-replay --test cluster --test opensearch_cluster -- --nocapture

## lint: formatting and clippy, as CI checks them.
lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

demo-stop:
	dev/demo stop

stack-up:
	dev/stack up

stack-down:
	dev/stack down

stack-status:
	dev/stack status
