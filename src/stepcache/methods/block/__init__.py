"""Block-level methods: run the head and tail of the network, decide whether its middle runs."""
