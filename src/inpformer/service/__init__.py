"""Serving a model on the line: the HTTP service and its operator page (`app`), operator feedback (`feedback`) and
watched folders (`watch`)."""
