"""magi_train.flow."""
