"""magi_train.tasks."""
