"""The process: CPU threads, host allocator, reproducible kernels, signals, console, error types, file modes."""
