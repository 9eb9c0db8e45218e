"""magi_train.data."""
