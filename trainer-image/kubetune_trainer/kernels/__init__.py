"""Optional faster implementations of parts of the model (loss, attention, layers), each checked against the
plain path on CPU."""
