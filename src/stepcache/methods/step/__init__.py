"""Step-level methods: answer a whole denoiser call (or its block stack) without running it."""
