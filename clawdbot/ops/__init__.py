"""Running the service: the runtime (config, reload, drain), limits, logs and metrics."""
