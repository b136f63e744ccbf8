"""Experiments built from several pipeline runs (data -> Ray Train -> eval per arm)."""
