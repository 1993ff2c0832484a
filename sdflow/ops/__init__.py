"""Operations: everything that speaks Prefect or a cluster (orchestration, artifacts, the server,
deployments, launchers, GPU slots, the environment record, sweeps)."""
