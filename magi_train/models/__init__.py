"""magi_train.models."""
