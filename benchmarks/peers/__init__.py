"""Child scripts run with a peer's own python (vLLM, tunix); see benchmarks/bench_peers.py."""
