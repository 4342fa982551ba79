"""TRL adapters (installed as ``atlas_rl.trainers``)."""
