"""magi_train.inference."""
