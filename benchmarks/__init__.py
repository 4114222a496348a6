"""Benchmarks and experiments (`opsd bench ...`): they drive the runtime in launch/ and workers/
and measure it; nothing in launch/, workers/ or opsd/ imports them, except the CLI's `bench`
subcommand."""
