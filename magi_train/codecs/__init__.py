"""magi_train.codecs."""
