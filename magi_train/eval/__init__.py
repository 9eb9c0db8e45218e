"""magi_train.eval."""
