"""Training utilities: optimiser, learning-rate schedules and Polyak (EMA) weight averaging."""
