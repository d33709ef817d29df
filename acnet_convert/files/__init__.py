"""Files: checkpoints, the round trip (save, load, original weights), model specs, inputs and export."""
