"""Built-in insert driver: workloads, a client-timestamping load runner, its summary."""
