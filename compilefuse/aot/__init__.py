"""Ahead of time: ``compilefuse.export`` (an AOTInductor package a replica loads with
``compilefuse.load``) and ``compilefuse.fold`` (the folded model as a plain module)."""
