"""API dialects: route sets that decode a wire format into the engine contract and encode deltas back."""
